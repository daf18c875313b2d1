"""Supervised fine-tuning of a dense ConvNeXt V2 on accelerate: layer-wise lr decay, label budget, EMA, the loop.

The recipe is the official ConvNeXt V2 one (AdamW, per-step cosine schedule with warmup, layer-wise lr decay,
drop path, EMA, Mixup/CutMix with label smoothing, RandAugment, random erasing), built from timm's pieces where
they fit (``Mixup``, ``SoftTargetCrossEntropy``, ``LabelSmoothingCrossEntropy``, ``ModelEmaV3``, ``accuracy``).
Data order and augmentation are seeded per ``(seed, epoch, index)`` as in pretraining (see ``fcmae.engine``), so a
resumed run sees the same samples as an uninterrupted one.

Outputs in ``run.output_dir``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_N`` (accelerate state, the
last ``run.keep_last``), ``best.safetensors`` (the best evaluated weights, model or EMA, our dense layout),
``last.safetensors`` and ``last_ema.safetensors`` (the final weights).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fcmae.config import EmaConfig, FinetuneConfig, FinetuneDataConfig, MixupConfig, to_dict
from fcmae.engine import (
    EpochSampler,
    MetricsLogger,
    NonFiniteLossError,
    backward_and_step,
    find_latest_checkpoint,
    lr_at,
    no_weight_decay,
    print_main,
    sample_seed,
    save_checkpoint,
    scaled_lr,
    setup_run,
)
from fcmae.models.convnextv2 import ConvNeXtV2, create_model

LayerDecayType = Literal["single", "group"]
_STAGE_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.")
_DOWNSAMPLE_RE = re.compile(r"^downsample_layers\.(\d+)\.")


# ------------------------------------------------------------------------------------------- layer-wise lr decay
def num_layer_ids(depths: Sequence[int], kind: LayerDecayType = "single") -> int:
    """The id of the last layer (final ``norm`` + ``head``); ids run from 0 (the stem) to this value.

    ``single``: ``sum(depths) + 1``. ``group``: ``4 + ceil(depths[2] / 3)`` (13 for base/large/huge).
    """
    if kind == "single":
        return sum(depths) + 1
    if kind == "group":
        return 4 + math.ceil(depths[2] / 3)
    raise ValueError(f"layer decay type must be 'single' or 'group', got {kind!r}")


def layer_id(name: str, depths: Sequence[int], kind: LayerDecayType = "single") -> int:
    """Layer id of parameter ``name`` (our dense names) for layer-wise lr decay.

    ``single`` (one rate per block): the stem (``downsample_layers.0``) is layer 0; blocks are numbered
    consecutively 1 .. sum(depths) over the stages (``stages.i.j`` -> ``sum(depths[:i]) + j + 1``); the
    downsample layer in front of stage i (``downsample_layers.i``, i >= 1) shares the id of stage i's first block;
    everything else (final ``norm``, ``head``) is the last id, ``sum(depths) + 1``. The official code gives the stem
    the first block's id (1) instead of 0; we keep the stem one step further from the head, like the ``group`` rule.

    ``group`` (the official rule for base/large/huge, made explicit for any depths): with ``G = ceil(depths[2] / 3)``,
    the stem is 0; stage 0 (its blocks) is 1; stage 1 with its downsample layer is 2; stage 2's blocks come in groups
    of three consecutive blocks, ``stages.2.j`` -> ``3 + j // 3`` (ids 3 .. 2 + G), its downsample layer going with
    the first group (3); stage 3 with its downsample layer is ``3 + G``; final ``norm`` + ``head`` is ``4 + G``. For
    depths (3, 3, 27, 3) this is the official 0 .. 13 (stem 0, stage 3 = 12, head 13).
    """
    last = num_layer_ids(depths, kind)
    if m := _DOWNSAMPLE_RE.match(name):
        i = int(m[1])
        if i == 0:
            return 0
        if kind == "single":
            return sum(depths[:i]) + 1
        return {1: 2, 2: 3, 3: last - 1}[i]
    if m := _STAGE_RE.match(name):
        i, j = int(m[1]), int(m[2])
        if kind == "single":
            return sum(depths[:i]) + j + 1
        return {0: 1, 1: 2, 2: 3 + j // 3, 3: last - 1}[i]
    return last


def layer_scale(layer: int, last: int, decay: float) -> float:
    """lr multiplier ``decay ** (last - layer)``: 1 for the head, ``decay ** last`` for the stem."""
    return decay ** (last - layer)


def layer_decay_table(model: nn.Module, decay: float, kind: LayerDecayType = "single"
                      ) -> dict[str, tuple[int, float]]:
    """Parameter name -> ``(layer id, lr scale)`` for every parameter of a ConvNeXt V2 (``model.depths``)."""
    depths = model.depths
    last = num_layer_ids(depths, kind)
    table = {}
    for name, _ in model.named_parameters():
        lid = layer_id(name, depths, kind)
        table[name] = (lid, layer_scale(lid, last, decay))
    return table


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                          kind: LayerDecayType = "single") -> list[dict[str, Any]]:
    """AdamW groups, one per (layer id, decayed or not), each with its ``lr_scale`` (1.0 everywhere when
    ``layer_decay == 1``). Frozen parameters are left out; biases, norms, GRN and other 1-D parameters get no
    weight decay (``fcmae.engine.no_weight_decay``). Each group also carries ``layer_id`` for logging."""
    table = layer_decay_table(model, layer_decay, kind)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, scale = table[name]
        decayed = not no_weight_decay(name, p)
        g = groups.setdefault((lid, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                                               "lr_scale": scale, "layer_id": lid})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ------------------------------------------------------------------------------------------- label budget
def budget_counts(class_sizes: Mapping[int, int], fraction: float = 1.0, per_class: int = 0) -> dict[int, int]:
    """Images kept per class: ``round(fraction * n_c)`` (halves round up), capped at ``per_class`` when > 0.

    With ``fraction == 1`` that is exactly ``per_class`` images of every class, and a class with fewer is an error
    naming it; with ``fraction < 1`` too, ``per_class`` is only a cap. A class never drops to zero images (a class
    without a labelled example cannot be learned).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    out = {}
    for c, n in sorted(class_sizes.items()):
        k = max(1, math.floor(fraction * n + 0.5))
        if per_class > 0:
            if per_class > n and fraction == 1.0:
                raise ValueError(f"class {c} has only {n} training images, fewer than labels_per_class={per_class}")
            k = min(k, per_class)
        out[c] = k
    return out


def stratified_subset(targets: Sequence[int] | np.ndarray, fraction: float = 1.0, per_class: int = 0,
                      seed: int = 0) -> list[int]:
    """Sorted indices of a seeded, stratified subset of a labelled set (see ``budget_counts`` for the sizes).

    Each class draws from its own generator seeded by ``(seed, class)``, so the subset of one class does not
    depend on the others, and for one seed smaller budgets are subsets of larger ones.
    """
    targets = np.asarray(targets, dtype=np.int64)
    classes, sizes = np.unique(targets, return_counts=True)
    counts = budget_counts(dict(zip(classes.tolist(), sizes.tolist())), fraction, per_class)
    chosen = []
    for c, k in counts.items():
        idx = np.flatnonzero(targets == c)
        perm = np.random.default_rng([seed, c]).permutation(len(idx))
        chosen.append(idx[perm[:k]])
    return sorted(np.concatenate(chosen).tolist()) if chosen else []


# ------------------------------------------------------------------------------------------- data
class LabeledSamples(Dataset):
    """``base[indices[i]]`` as ``(image (C, H, W) float, label int, n_skipped int)``.

    With ``seed`` set, every item's augmentation draws from Python's, NumPy's and torch's global generators seeded
    by ``(seed, epoch, index)`` (timm's transforms use all three); their previous states are restored afterwards,
    so the sample does not depend on workers or on what ran before. Set ``epoch`` before iterating an epoch.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None, seed: int | None = None) -> None:
        self.base = base
        self.indices = list(indices) if indices is not None else list(range(len(base)))  # type: ignore[arg-type]
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _get(self, index: int) -> tuple:
        return self.base[self.indices[index]]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        if self.seed is None:
            item = self._get(index)
        else:
            s = sample_seed(self.seed, self.epoch, index)
            py_state, np_state = random.getstate(), np.random.get_state()
            try:
                random.seed(s)
                np.random.seed(s & 0xFFFFFFFF)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(s)
                    item = self._get(index)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        skipped = int(item[2]) if len(item) > 2 else 0
        return item[0], int(item[1]), skipped


def dataset_targets(ds: Dataset) -> list[int]:
    """Labels of a labelled dataset without decoding images (``targets`` or ``labels`` attribute)."""
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return [int(t) for t in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]


@dataclass
class FinetuneData:
    """Training/validation sets (items ``(image, label, n_skipped)``) and what the run reports about them."""

    train: LabeledSamples
    val: LabeledSamples
    classes: list[str]
    train_total: int  # images available before the label budget (after data.limit)
    train_counts: dict[int, int]  # images per class kept for training


def _class_folder(path: str | Path, what: str) -> Path:
    from fcmae.data import DataError

    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what} folder {p} does not exist" if not p.exists() else f"{what}: {p} is not a folder")
    return p


def build_finetune_data(cfg: FinetuneDataConfig, in_chans: int, seed: int) -> FinetuneData:
    """The labelled sets named by ``cfg.source`` with the fine-tuning (train) and evaluation (val) transforms.

    imagenet: ``<path>/train`` and ``<path>/val`` class folders; folder: ``train_path`` and ``val_path``;
    fashion_mnist: the train and test IDX files in ``path``. Training keeps the first ``limit`` images (if > 0),
    then the label budget (``train_fraction`` / ``labels_per_class``, seeded by ``label_seed``).
    """
    from fcmae.data import (
        DATASET_DEFAULT_FASHION_MNIST,
        DataError,
        FashionMNIST,
        LabeledImageFolder,
        build_eval_transform,
        build_finetune_transform,
    )

    train_tf = build_finetune_transform(
        cfg.input_size, in_chans, auto_augment=cfg.auto_augment or None, reprob=cfg.reprob, remode=cfg.remode,
        recount=cfg.recount, color_jitter=cfg.color_jitter, scale=tuple(cfg.scale), hflip=cfg.hflip,
        interpolation=cfg.interpolation)
    val_tf = build_eval_transform(cfg.input_size, cfg.crop_pct, in_chans)
    if cfg.source == "fashion_mnist":
        root = cfg.path or DATASET_DEFAULT_FASHION_MNIST
        train_base: Dataset = FashionMNIST(root, "train", train_tf, in_chans)
        val_base: Dataset = FashionMNIST(root, "test", val_tf, in_chans)
        classes = list(FashionMNIST.classes)
    elif cfg.source in ("imagenet", "folder"):
        if cfg.source == "imagenet":
            root = _class_folder(cfg.path, "data.path")
            train_dir, val_dir = root / "train", root / "val"
        else:
            train_dir, val_dir = Path(cfg.train_path), Path(cfg.val_path)
        tr = LabeledImageFolder(_class_folder(train_dir, "training"), train_tf, in_chans, cfg.on_bad_image)
        va = LabeledImageFolder(_class_folder(val_dir, "validation"), val_tf, in_chans, cfg.on_bad_image)
        if va.classes != tr.classes:
            only_t = sorted(set(tr.classes) - set(va.classes))[:5]
            only_v = sorted(set(va.classes) - set(tr.classes))[:5]
            raise DataError(f"class folders differ between {train_dir} and {val_dir} (only in train: {only_t}, "
                            f"only in val: {only_v}); labels would not match")
        train_base, val_base, classes = tr, va, list(tr.classes)
    else:
        raise DataError(f"data.source={cfg.source!r} is not one of ['imagenet', 'folder', 'fashion_mnist']")

    targets = dataset_targets(train_base)
    pool = list(range(min(cfg.limit, len(targets)) if cfg.limit else len(targets)))
    total = len(pool)
    if cfg.train_fraction < 1.0 or cfg.labels_per_class > 0:
        sub = stratified_subset([targets[i] for i in pool], cfg.train_fraction, cfg.labels_per_class, cfg.label_seed)
        pool = [pool[i] for i in sub]
    counts: dict[int, int] = {}
    for i in pool:
        counts[targets[i]] = counts.get(targets[i], 0) + 1
    n_val = len(val_base)  # type: ignore[arg-type]
    val_idx = range(min(cfg.val_limit, n_val) if cfg.val_limit else n_val)
    return FinetuneData(LabeledSamples(train_base, pool, seed), LabeledSamples(val_base, val_idx), classes,
                        total, dict(sorted(counts.items())))


# ------------------------------------------------------------------------------------------- model set-up
def fold_probe_head(sd: Mapping[str, Tensor], eps: float = 1e-6) -> dict[str, Tensor]:
    """A linear-probe head ``head.0`` (BatchNorm1d, affine=False) + ``head.1`` (Linear) -> one Linear ``head``.

    ``W' = W / sqrt(var + eps)``, ``b' = b - W' @ mean``: the exported weights then load into a plain model.
    State dicts without such a head are returned unchanged (as a new dict).
    """
    out = dict(sd)
    if "head.1.weight" not in out or "head.0.running_mean" not in out:
        return out
    w, b = out.pop("head.1.weight").float(), out.pop("head.1.bias").float()
    mean, var = out.pop("head.0.running_mean").float(), out.pop("head.0.running_var").float()
    out.pop("head.0.num_batches_tracked", None)
    w2 = w / torch.sqrt(var + eps)
    out["head.weight"] = w2
    out["head.bias"] = b - w2 @ mean
    return out


def load_init_weights(model: ConvNeXtV2, path: str | Path) -> dict[str, Any]:
    """Load weights in any layout ``fcmae.convert.to_dense`` reads into ``model`` for fine-tuning.

    - A head that is absent or of another shape is re-initialised (``model.reset_classifier``: trunc normal std
      2e-5, zero bias); a head of the right shape is kept.
    - The FCMAE encoder has no final ``norm``: the model's fresh LayerNorm (weight 1, bias 0) is kept then.
    - Stem weights for another number of input channels are adapted with timm's ``adapt_input_conv``.
    - Any other missing, extra or mis-shaped tensor is an error naming it (e.g. another variant's weights).

    Returns ``{"layout", "variant_in_file", "fresh": [keys initialised fresh], "head_reset": bool,
    "adapted_stem": bool}``.
    """
    from timm.models import adapt_input_conv

    from fcmae.convert import infer_variant, to_dense
    from fcmae.io import load_state_dict_file

    raw, _ = load_state_dict_file(path)
    dense, layout = to_dense(fold_probe_head(raw))
    try:
        variant = infer_variant(dense)
    except ValueError:
        variant = "unknown"
    target = model.state_dict()
    adapted = False
    stem_key = "downsample_layers.0.0.weight"
    if stem_key in dense and dense[stem_key].ndim == 4 and dense[stem_key].shape[1] != model.in_chans:
        stem = dense[stem_key]
        dense[stem_key] = adapt_input_conv(model.in_chans, stem, base_chans=stem.shape[1]).contiguous()
        adapted = True
    head_reset = isinstance(model.head, nn.Linear) and (
        "head.weight" not in dense or dense["head.weight"].shape != target["head.weight"].shape
        or "head.bias" not in dense or dense["head.bias"].shape != target["head.bias"].shape)
    if head_reset or not isinstance(model.head, nn.Linear):
        dense.pop("head.weight", None)
        dense.pop("head.bias", None)
    unexpected = [k for k in dense if k not in target]
    mismatched = [f"{k} {tuple(dense[k].shape)} vs {tuple(target[k].shape)}" for k in dense
                  if k in target and dense[k].shape != target[k].shape]
    missing = [k for k in target if k not in dense and not k.startswith(("norm.", "head."))]
    if unexpected or mismatched or missing:
        shown = "; ".join([*(f"unexpected {k}" for k in unexpected[:3]), *mismatched[:3],
                           *(f"missing {k}" for k in missing[:3])])
        raise ValueError(f"{path}: weights of {variant} ({layout} layout) do not fit the model "
                         f"(depths {model.depths}, dims {model.dims}): {shown}")
    model.load_state_dict(dense, strict=False)
    if head_reset:
        model.reset_classifier(model.num_classes)
    fresh = [k for k in target if k not in dense]
    return {"layout": layout, "variant_in_file": variant, "fresh": fresh, "head_reset": head_reset,
            "adapted_stem": adapted}


def enable_linear_probe(model: ConvNeXtV2) -> None:
    """Freeze everything but the head and put a ``BatchNorm1d(affine=False)`` in front of it, as MAE's linear
    probing does (the features' scale differs a lot between pretrained encoders; BN makes one lr fit all).
    The trunk runs in eval mode during training (see ``set_train_mode``): no drop path in frozen blocks."""
    if not isinstance(model.head, nn.Linear):
        raise ValueError("linear probing needs a Linear head (num_classes > 0)")
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.head
    head.requires_grad_(True)
    bn = nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6).to(head.weight.device)
    model.head = nn.Sequential(bn, head)


def set_train_mode(model: nn.Module, linear_probe: bool) -> None:
    """``model.train()``; for linear probing everything but the head goes back to eval mode."""
    model.train()
    if linear_probe:
        for name, child in model.named_children():
            if name != "head":
                child.eval()


def classifier_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights in our dense layout (a linear-probe head folded into one Linear), on CPU."""
    return fold_probe_head({k: v.detach().cpu() for k, v in model.state_dict().items()})


def export_classifier(model: nn.Module, path: Path, metadata: Mapping[str, Any]) -> Path:
    """Write the classifier's dense weights + string metadata as safetensors (atomically)."""
    from fcmae.io import save_state_dict

    return save_state_dict(path, classifier_state_dict(model), {k: str(v) for k, v in metadata.items()})


# ------------------------------------------------------------------------------------------- loss, EMA
def build_mixup_and_loss(cfg: MixupConfig, num_classes: int) -> tuple[Any | None, nn.Module]:
    """``(timm Mixup or None, criterion)``.

    Mixup/CutMix on (any alpha > 0 or ``cutmix_minmax``): timm's ``Mixup`` makes smoothed soft targets and the
    loss is ``SoftTargetCrossEntropy``. Off: no Mixup object at all, hard labels, ``LabelSmoothingCrossEntropy``
    (or plain cross-entropy when ``smoothing == 0``).
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                      cutmix_minmax=list(cfg.cutmix_minmax) if cfg.cutmix_minmax else None, prob=cfg.prob,
                      switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, nn.CrossEntropyLoss()


def build_ema(model: nn.Module, cfg: EmaConfig) -> nn.Module | None:
    """timm ``ModelEmaV3`` of ``model`` (same device and dtype), or None when disabled.

    ``ema.update(model, step)``: ``ema = d * ema + (1 - d) * model`` over parameters and buffers, with ``d = decay``
    (or timm's warmup ``min(decay, 1 - (1 + t)^(-2/3))`` when ``cfg.warmup``); the first update (step 1) copies.
    """
    if not cfg.enabled:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup)
    ema.requires_grad_(False)
    return ema


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator, desc: str = "eval", progress: bool = False
             ) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader`` (all processes).

    ``loader`` yields ``(images (B, C, H, W), labels (B,), ...)``; with fewer than 5 classes "top-5" is top-C.
    Returns ``{"top1", "top5", "loss", "images"}``.
    """
    from timm.utils import accuracy
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    c1 = c5 = loss_sum = 0.0
    n = 0
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and accelerator.is_main_process))
    for batch in bar:
        images, labels = batch[0], batch[1]
        with accelerator.autocast():
            logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        if labels.numel() == 0:
            continue
        top1, top5 = accuracy(logits, labels, topk=(1, 5))
        b = labels.shape[0]
        c1 += float(top1) * b / 100.0
        c5 += float(top5) * b / 100.0
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        n += b
    bar.close()
    model.train(was_training)
    if n == 0:
        return {"top1": math.nan, "top5": math.nan, "loss": math.nan, "images": 0}
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss_sum / n, "images": n}


# ------------------------------------------------------------------------------------------- the step
def finetune_step(model: nn.Module, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer, accelerator,
                  lr: float, criterion: nn.Module, mixup_fn: Any | None = None, clip_grad: float | None = None
                  ) -> dict[str, Any]:
    """One micro-batch: (Mixup/CutMix), forward, loss, backward, and at accumulation boundaries the AdamW step
    with ``lr * lr_scale`` per group (layer-wise decay).

    images: ``(B, C, H, W)``; labels: ``(B,)`` int64. Returns ``{"loss": float (mean over processes),
    "stepped": bool, "grad_norm": float | None}``; raises ``NonFiniteLossError`` before any update.
    """
    targets: Tensor = labels
    if mixup_fn is not None:
        images, targets = mixup_fn(images, labels)  # targets: (B, num_classes) soft
    with accelerator.accumulate(model):
        return backward_and_step(criterion(model(images), targets), optimizer, accelerator, lr, clip_grad)


# ------------------------------------------------------------------------------------------- state
@dataclass
class FinetuneState:
    """Progress counters and the best result so far, saved with every checkpoint."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    skipped_files: int = 0
    best_top1: float = -1.0
    best_top5: float = -1.0
    best_epoch: int = -1
    best_source: str = ""  # "model" or "ema"

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        types = {f.name: f.type for f in fields(self)}
        for k, v in d.items():
            if k in types:
                setattr(self, k, {"int": int, "float": float, "str": str}[str(types[k])](v))


def _describe_budget(data: FinetuneData, cfg: FinetuneDataConfig) -> str:
    n = sum(data.train_counts.values())
    if n == data.train_total:
        return f"{n} training images"
    per = sorted(set(data.train_counts.values()))
    per_txt = str(per[0]) if len(per) == 1 else f"{per[0]}-{per[-1]}"
    return (f"label budget: {n} of {data.train_total} training images ({per_txt} per class; "
            f"train_fraction {cfg.train_fraction:g}, labels_per_class {cfg.labels_per_class}, seed {cfg.label_seed})")


# ------------------------------------------------------------------------------------------- the run
def run_finetuning(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune as configured; returns a summary (paths, accuracies, throughput)."""
    from tqdm import tqdm

    accelerator, mp, out_dir = setup_run(cfg.run, cfg)
    ckpt_root = out_dir / "checkpoints"

    # data
    data = build_finetune_data(cfg.data, cfg.model.in_chans, cfg.run.seed)
    num_classes = cfg.model.num_classes or len(data.classes)
    if num_classes < len(data.classes):
        raise ValueError(f"model.num_classes={num_classes} but the data has {len(data.classes)} classes")
    global_batch = cfg.run.batch_size * accelerator.num_processes
    if len(data.train) < global_batch:
        raise ValueError(f"the training set has {len(data.train)} images, fewer than one global batch "
                         f"({cfg.run.batch_size} x {accelerator.num_processes} processes); lower run.batch_size")
    sampler = EpochSampler(len(data.train), cfg.run.seed)
    pin = torch.cuda.is_available()
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=cfg.run.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
        drop_last=True, pin_memory=pin, persistent_workers=False, generator=torch.Generator().manual_seed(0))
    val_loader = torch.utils.data.DataLoader(
        data.val, batch_size=cfg.run.eval_batch_size or 2 * cfg.run.batch_size, shuffle=False,
        num_workers=cfg.data.num_workers, drop_last=False, pin_memory=pin)

    # model
    m = cfg.model
    model = create_model(m.name, num_classes, m.in_chans, m.drop_path_rate, m.head_init_scale)
    init_info = load_init_weights(model, m.init) if m.init else None
    if cfg.run.linear_probe:
        enable_linear_probe(model)
    o = cfg.optim
    eff_batch = global_batch * cfg.run.accum_iter
    base_lr = o.lr if o.lr is not None else scaled_lr(o.blr, eff_batch)
    blr = base_lr * 256.0 / eff_batch  # the configured blr, or the one an absolute optim.lr amounts to
    groups = finetune_param_groups(model, o.weight_decay, o.layer_decay, o.layer_decay_type)
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=o.betas, eps=o.eps)
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    unwrapped: ConvNeXtV2 = accelerator.unwrap_model(model)
    ema = build_ema(unwrapped, cfg.ema)  # after prepare: the EMA copy lives on the training device
    mixup_fn, criterion = build_mixup_and_loss(cfg.mixup, num_classes)
    state = FinetuneState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    steps_per_epoch = len(loader) // cfg.run.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch has {len(loader)} batches, fewer than run.accum_iter={cfg.run.accum_iter}")
    total_steps = o.epochs * steps_per_epoch
    warmup_steps = int(round(o.warmup_epochs * steps_per_epoch))
    last_step = min(total_steps, cfg.run.max_steps) if cfg.run.max_steps > 0 else total_steps

    resume_from = None
    if cfg.run.resume == "auto":
        resume_from = find_latest_checkpoint(ckpt_root)
    elif cfg.run.resume:
        resume_from = Path(cfg.run.resume)
        if not resume_from.is_dir():
            raise FileNotFoundError(f"run.resume: checkpoint directory not found: {resume_from}")
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        print_main(accelerator, f"resumed from {resume_from} (epoch {state.epoch}, step {state.step})")

    say = lambda *a: print_main(accelerator, *a)  # noqa: E731
    say(f"fcmae finetune: {m.name}, {num_classes} classes, input {cfg.data.input_size}x{cfg.data.input_size}, "
        f"in_chans {m.in_chans}, {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"mixed precision {mp}")
    say(f"data: {cfg.data.source}; {_describe_budget(data, cfg.data)}; {len(data.val)} validation images")
    if init_info is not None and resume_from is None:
        say(f"init: {m.init} ({init_info['layout']} layout, {init_info['variant_in_file']})"
            + (", stem adapted to in_chans" if init_info["adapted_stem"] else ""))
        if init_info["fresh"]:
            why = " (head re-initialised: trunc normal std 2e-5, zero bias)" if init_info["head_reset"] else ""
            say(f"initialised fresh (not in the checkpoint): {', '.join(init_info['fresh'])}{why}")
    elif init_info is None:
        say("init: none (random weights; set model.init or --init to fine-tune pretrained weights)")
    say(f"effective batch {eff_batch} = {cfg.run.batch_size} x {accelerator.num_processes} x {cfg.run.accum_iter}; "
        f"blr {blr:g} -> lr {base_lr:.3e}{' (optim.lr given)' if o.lr is not None else ''}; "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps total, "
        f"warmup {warmup_steps}")
    if o.layer_decay < 1.0:
        lids = sorted({g["layer_id"]: g["lr_scale"] for g in optimizer.param_groups}.items())
        say(f"layer decay {o.layer_decay_type} {o.layer_decay:g}: layer ids {lids[0][0]}..{lids[-1][0]}, "
            f"lr scales {lids[0][1]:.3g} .. {lids[-1][1]:.3g}")
    mixing = "Mixup/CutMix" if mixup_fn is not None else "no Mixup/CutMix"
    say(f"{mixing}, label smoothing {cfg.mixup.smoothing:g}, loss {type(criterion).__name__}; "
        f"EMA {'decay ' + format(cfg.ema.decay, 'g') if ema is not None else 'off'}"
        + ("; linear probe (trunk frozen)" if cfg.run.linear_probe else ""))

    logger = MetricsLogger(out_dir, accelerator.is_main_process)
    summary: dict[str, Any] = {"output_dir": str(out_dir), "lr": base_lr, "blr": blr, "effective_batch": eff_batch,
                               "train_images": len(data.train), "num_classes": num_classes}
    meta_base = {"format": "fcmae-classifier", "layout": "dense", "variant": m.name, "in_chans": m.in_chans,
                 "num_classes": num_classes, "image_size": cfg.data.input_size, "crop_pct": cfg.data.crop_pct,
                 "classes": json.dumps(data.classes), "config": json.dumps(to_dict(cfg))}
    last_eval: dict[str, Any] = {}

    def run_eval(epoch: int) -> None:
        res = evaluate(model, val_loader, accelerator, f"eval {epoch}", cfg.run.progress)
        rec: dict[str, Any] = {"step": state.step, "epoch": epoch, "val_top1": res["top1"], "val_top5": res["top5"],
                               "val_loss": res["loss"]}
        cands = [("model", res, unwrapped)]
        if ema is not None:
            res_e = evaluate(ema.module, val_loader, accelerator, f"eval ema {epoch}", cfg.run.progress)
            rec.update(ema_top1=res_e["top1"], ema_top5=res_e["top5"], ema_loss=res_e["loss"])
            cands.append(("ema", res_e, ema.module))
        source, best_res, best_model = max(cands, key=lambda c: c[1]["top1"])
        if best_res["top1"] > state.best_top1:
            state.best_top1, state.best_top5 = best_res["top1"], best_res["top5"]
            state.best_epoch, state.best_source = epoch, source
            if accelerator.is_main_process:
                export_classifier(best_model, out_dir / "best.safetensors",
                                  {**meta_base, "weights": source, "epoch": epoch, "step": state.step,
                                   "top1": f"{best_res['top1']:.4f}", "top5": f"{best_res['top5']:.4f}"})
        rec.update(best_top1=state.best_top1, best_source=state.best_source)
        logger.log(rec)
        ema_txt = f"; EMA top-1 {rec['ema_top1']:.2f} top-5 {rec['ema_top5']:.2f}" if ema is not None else ""
        say(f"eval after epoch {epoch} (step {state.step}): top-1 {res['top1']:.2f} top-5 {res['top5']:.2f} "
            f"loss {res['loss']:.4f}{ema_txt}; best {state.best_top1:.2f} ({state.best_source})")
        last_eval.clear()
        last_eval.update(rec)

    kill_after = int(os.environ.get("FCMAE_TEST_SIGKILL_AFTER_STEP", "0"))  # test hook: simulate a crash
    set_train_mode(model, cfg.run.linear_probe)
    t_start = time.perf_counter()
    imgs_run = 0
    last_loss = math.nan
    done = state.step >= last_step
    last_saved = state.step if resume_from is not None else -1
    evaluated_at = -1
    while not done and state.epoch < o.epochs:
        epoch = state.epoch
        sampler.use_epoch(epoch)
        data.train.epoch = epoch
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        bar = tqdm(total=len(loader) - state.batch_in_epoch, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.run.progress and accelerator.is_main_process))
        loss_sum, loss_n, t_log, imgs_log = 0.0, 0, time.perf_counter(), 0
        for batch in epoch_loader:
            if state.batch_in_epoch >= steps_per_epoch * cfg.run.accum_iter:
                break  # leftover micro-batches that cannot fill an optimizer step
            lr = lr_at(state.step, total_steps, warmup_steps, base_lr, o.min_lr)
            try:
                out = finetune_step(model, batch[0], batch[1], optimizer, accelerator, lr, criterion, mixup_fn,
                                    o.clip_grad)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"{exc} at epoch {epoch}, step {state.step} (lr {lr:.3e}); stopping without saving. "
                    f"Last good checkpoint: {find_latest_checkpoint(ckpt_root) or 'none'}. "
                    "Try a lower optim.blr, optim.clip_grad, or fp32.") from None
            n_imgs = batch[0].shape[0] * accelerator.num_processes
            state.skipped_files += int(accelerator.gather(batch[2].sum().reshape(1)).sum())
            state.batch_in_epoch += 1
            state.images_seen += n_imgs
            imgs_run += n_imgs
            imgs_log += n_imgs
            loss_sum += out["loss"]
            loss_n += 1
            last_loss = out["loss"]
            bar.update(1)
            if not out["stepped"]:
                continue
            state.step += 1
            if ema is not None:
                ema.update(unwrapped, step=state.step)
            now = time.perf_counter()
            ips = imgs_log / max(now - t_log, 1e-9)
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            if state.step % cfg.run.log_every == 0 or state.step == last_step:
                logger.log({"step": state.step, "epoch": epoch, "loss": loss_sum / loss_n, "lr": lr, "blr": blr,
                            "img_per_s": ips, "images_seen": state.images_seen,
                            "skipped_files": state.skipped_files, "time_s": now - t_start})
                loss_sum, loss_n, t_log, imgs_log = 0.0, 0, now, 0
            if cfg.run.save_every_steps and state.step % cfg.run.save_every_steps == 0:
                save_checkpoint(accelerator, ckpt_root, state.step, cfg.run.keep_last)
                last_saved = state.step
            if kill_after and state.step == kill_after + 1:
                os.kill(os.getpid(), 9)
            if state.step >= last_step:
                done = True
                break
        bar.close()
        if state.batch_in_epoch >= steps_per_epoch * cfg.run.accum_iter:
            state.epoch += 1
            state.batch_in_epoch = 0
            say(f"epoch {epoch} done: step {state.step}, loss {last_loss:.4f}")
            if state.epoch % cfg.run.eval_every_epochs == 0 or state.epoch == o.epochs or done:
                run_eval(epoch)
                evaluated_at = state.step
                set_train_mode(model, cfg.run.linear_probe)
        if last_saved != state.step or state.batch_in_epoch == 0:
            save_checkpoint(accelerator, ckpt_root, state.step, cfg.run.keep_last)
            last_saved = state.step
    if evaluated_at != state.step:  # stopped mid-epoch (max_steps) or resumed a finished run
        run_eval(state.epoch if state.batch_in_epoch else state.epoch - 1)
    if accelerator.is_main_process:
        meta_last = {**meta_base, "epoch": state.epoch, "step": state.step}
        export_classifier(unwrapped, out_dir / "last.safetensors", {**meta_last, "weights": "model"})
        if ema is not None:
            export_classifier(ema.module, out_dir / "last_ema.safetensors", {**meta_last, "weights": "ema"})
    wall = time.perf_counter() - t_start
    summary.update({
        "final_loss": last_loss, "steps": state.step, "epochs": state.epoch, "wall_s": wall,
        "img_per_s": imgs_run / max(wall, 1e-9), "skipped_files": state.skipped_files,
        "val_top1": last_eval.get("val_top1"), "val_top5": last_eval.get("val_top5"),
        "ema_top1": last_eval.get("ema_top1"), "ema_top5": last_eval.get("ema_top5"),
        "best_top1": state.best_top1, "best_top5": state.best_top5, "best_epoch": state.best_epoch,
        "best_source": state.best_source, "best": str(out_dir / "best.safetensors"),
        "last": str(out_dir / "last.safetensors"), "checkpoint": str(find_latest_checkpoint(ckpt_root)),
    })
    logger.log({"summary": summary})
    logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
