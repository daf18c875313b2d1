"""Typed configuration: OmegaConf structured configs with the paper's defaults, YAML files, ``key=value`` overrides.

A config is a tree of dataclasses. ``load_config(PretrainConfig, "demo", ["optim.blr=1e-4"])`` starts from the
defaults, merges the YAML file (a path, or the name of a config shipped in ``fcmae/configs``), then the dotlist
overrides, and returns the dataclass object after ``validate()`` range-checked every value. OmegaConf does the
typing (ints stay ints, ``Literal`` choices, tuples) and rejects unknown keys; every failure is a ``ConfigError``
whose one-line message names the file and the key.

The two recipes share one vocabulary: ``model``, ``data``, ``optim`` and ``run`` sections whose common keys are
defined once in the base classes below; the recipe classes add only what is theirs.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from fcmae.models.registry import MASK_RATIO

T = TypeVar("T")

MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {why}")


# --------------------------------------------------------------------------------------------- shared sections
@dataclass
class ModelConfig:
    name: str = "convnextv2_base"
    in_chans: int = 3
    drop_path_rate: float = 0.0
    # null: the variant's block (V2 GRN, V1 LayerScale); false: without GRN (the paper's ablation; no GRN parameters)
    use_grn: bool | None = None


@dataclass
class DataConfig:
    source: str = "imagenet"
    path: str = ""
    input_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    num_workers: int = 2
    on_bad_image: Literal["skip", "error"] = "skip"
    limit: int = 0  # use only the first N training images (0 = all), for quick experiments
    # folder/imagenet pretraining: a list of the image files (one per line, relative to data.path), read when it
    # exists, else written there by the first process after scanning (others read it: no second scan)
    file_list: str = ""
    # data.source=webdataset: the shards' index.json when it is not beside them (e.g. for pipe:/URL shards)
    shard_index: str = ""
    shuffle_buffer: int = 1000  # webdataset: samples shuffled in memory per reader stream
    # skipped (unreadable) samples may be at most this share of what a run reads, else it stops (1 = never stops)
    max_skipped_fraction: float = 0.01
    # webdataset fine-tuning: labels from `cls` (""), or from this field of each sample's `json` (e.g. "label")
    label_field: str = ""
    # hf: the columns of the images ({bytes, path} or bytes) and, fine-tuning, of the labels (ImageNet-1k's names)
    image_column: str = "image"
    label_column: str = "label"


@dataclass
class OptimConfig:
    """AdamW with a per-step schedule: linear warmup, then half-cosine to ``min_lr``.

    The schedule is sized in epochs (``epochs``, ``warmup_epochs``) unless ``steps`` / ``warmup_steps`` are set,
    which size it in optimizer steps (so a short run still completes its cosine).
    """

    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    epochs: int = 800
    warmup_epochs: float = 40.0
    steps: int | None = None  # total optimizer steps (None: epochs x steps per epoch)
    warmup_steps: int | None = None  # None: warmup_epochs x steps per epoch
    clip_grad: float | None = None


@dataclass
class RunConfig:
    output_dir: str = "output/run"
    batch_size: int = 64  # per device
    accum_iter: int = 1  # gradient accumulation steps
    seed: int = 0
    mixed_precision: str = "auto"  # no | bf16 | fp16 | auto (bf16 on GPUs that support it, else no)
    resume: str = ""  # "", "auto" (newest complete checkpoint in output_dir) or a checkpoint directory
    overwrite: bool = False  # start fresh in an output_dir that holds another run's outputs
    max_steps: int = 0  # stop after this many optimizer steps without changing the schedule (0 = run it all)
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0 = epoch ends and the end only)
    save_every_epochs: int = 1  # checkpoint every N epochs (and always at the end)
    keep_last: int = 2
    log_every: int = 10
    threads: int = 0  # torch intra-op threads (0 = the library default: torch picks, usually one per core)
    progress: bool = True
    # resume=auto refuses a config that changes what is trained (see TRAINING_KEYS_FREE); true resumes anyway and
    # records both configs in config_history.jsonl
    allow_config_change: bool = False
    # torch.compile of the model (in place, before accelerate wraps it): no | default | reduce-overhead |
    # max-autotune (torch.compile modes; inductor only), with compile_backend (inductor; aot_eager compiles fast)
    compile: str = "no"
    compile_backend: str = "inductor"
    # bounded waiting (fcmae.train.faults): the process group's set-up and every collective give up after
    # dist_timeout_s (a lost or frozen peer: one line, exit 5); no step completed for hang_timeout_s (0 = 50 x the
    # median step time, at least 300 s): every process writes its stacks to hang-<rank>.txt and exits with status 4
    dist_timeout_s: float = 600.0
    hang_timeout_s: float = 0.0
    # activation checkpointing per block (the models' set_grad_checkpointing): keeps each block's input only and
    # recomputes the block in backward; the same losses and gradients for a fraction of the activation memory, at
    # the cost of one more forward (benchmarks/memory.py measures both)
    grad_checkpointing: bool = False
    # GPU settings, no effect on a CPU (fcmae.train.gpu says why these defaults): TF32 matmuls and cuDNN convolutions,
    # cuDNN's autotuner (a run's shapes are fixed), conv weights stored channels-last
    tf32: bool = True
    cudnn_benchmark: bool = True
    channels_last: bool = True
    # experiment trackers through accelerate: a list or one name (tensorboard, wandb, mlflow, aim, comet_ml, clearml,
    # dvclive, swanlab, trackio; none = [] or "none"); the same records as metrics.jsonl, the config as hyperparameters
    log_with: Any = field(default_factory=list)
    run_name: str = ""  # the tracker's run name ("" = the output folder's name)
    project: str = "fcmae"  # the tracker's project (W&B), experiment (MLflow, Aim), folder (TensorBoard)


TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


def _trackers(value: Any) -> list[str]:
    """``run.log_with`` -> a list of tracker names (a name, a comma list or a list; none, "" or [] -> [])."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    out = [str(n).strip().lower() for n in names if str(n).strip() and str(n).strip().lower() != "none"]
    for n in out:
        _check(n in TRACKERS, "run.log_with", value, f"names {n!r}, not one of {list(TRACKERS)} (or none)")
    return list(dict.fromkeys(out))


def _validate_common(cfg: Any, task: Literal["pretrain", "finetune"]) -> Any:
    """Range checks of the shared sections (the recipe classes add theirs); returns the data source's row of
    ``fcmae.data.sources.SOURCES``."""
    from fcmae.data.sources import SOURCES, source_names
    from fcmae.models.registry import get_variant

    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    try:
        get_variant(m.name)
    except ValueError as exc:
        raise ConfigError(f"model.name: {exc}") from None
    _check(m.in_chans in (1, 3), "model.in_chans", m.in_chans, "must be 1 or 3 (images are decoded to gray or RGB)")
    _check(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", m.drop_path_rate, "must be in [0, 1)")
    _check(d.source in source_names(task), "data.source", d.source, f"is not one of {source_names(task)}")
    src = SOURCES[d.source]
    _check(d.input_size > 0 and d.input_size % 32 == 0, "data.input_size", d.input_size,
           "must be a positive multiple of 32")
    lo, hi = d.crop_scale
    _check(0.0 < lo <= hi <= 1.0, "data.crop_scale", d.crop_scale, "needs 0 < min <= max <= 1")
    _check(0.0 <= d.hflip <= 1.0, "data.hflip", d.hflip, "must be in [0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.limit >= 0, "data.limit", d.limit, "must be >= 0 (0 = all)")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 1")
    _check(0.0 <= d.max_skipped_fraction <= 1.0, "data.max_skipped_fraction", d.max_skipped_fraction,
           "must be in [0, 1]")
    _check(not src.streamed or d.limit == 0, "data.limit", d.limit, f"is not available with data.source={d.source}")
    _check(src.image_files or not d.file_list, "data.file_list", d.file_list, "lists image files: use it with "
           "data.source=folder or imagenet")
    _check(o.blr > 0 or (o.lr or 0) > 0, "optim.blr", o.blr, "must be > 0")
    _check(o.lr is None or o.lr > 0, "optim.lr", o.lr, "must be > 0 (or null to use optim.blr)")
    _check(0.0 <= o.min_lr, "optim.min_lr", o.min_lr, "must be >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", o.betas, "must be in [0, 1)")
    _check(o.epochs >= 1, "optim.epochs", o.epochs, "must be >= 1")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    _check(o.steps is None or o.steps >= 1, "optim.steps", o.steps, "must be >= 1 (or null to use optim.epochs)")
    _check(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad", o.clip_grad, "must be > 0 (or null: off)")
    if r.mixed_precision == "False":  # YAML 1.1 reads a bare `no` as false
        r.mixed_precision = "no"
    _check(r.mixed_precision in MIXED_PRECISION, "run.mixed_precision", r.mixed_precision,
           f"is not one of {list(MIXED_PRECISION)}")
    for key in ("batch_size", "accum_iter", "keep_last", "log_every", "save_every_epochs"):
        _check(getattr(r, key) >= 1, f"run.{key}", getattr(r, key), "must be >= 1")
    _check(r.dist_timeout_s > 0, "run.dist_timeout_s", r.dist_timeout_s, "must be > 0 (seconds)")
    _check(r.hang_timeout_s >= 0, "run.hang_timeout_s", r.hang_timeout_s, "must be >= 0 (seconds; 0 = automatic)")
    for key in ("max_steps", "save_every_steps"):
        _check(getattr(r, key) >= 0, f"run.{key}", getattr(r, key), "must be >= 0 (0 = off)")
    if r.compile == "False":  # YAML 1.1 reads a bare `no` as false
        r.compile = "no"
    _check(r.compile in COMPILE_MODES, "run.compile", r.compile, f"is not one of {list(COMPILE_MODES)}")
    _check(r.compile_backend.strip() != "", "run.compile_backend", r.compile_backend, "must not be empty")
    _check(r.compile in ("no", "default") or r.compile_backend == "inductor", "run.compile", r.compile,
           "is an inductor mode: it needs run.compile_backend=inductor (other backends take run.compile=default)")
    _check(r.threads >= 0, "run.threads", r.threads, "must be >= 0 (0 = the library default)")
    _check(r.output_dir.strip() != "", "run.output_dir", r.output_dir, "must not be empty")
    r.log_with = _trackers(r.log_with)
    _check(r.resume in ("", "auto") or not r.overwrite, "run.overwrite", r.overwrite,
           "cannot be combined with run.resume")
    return src


# --------------------------------------------------------------------------------------------- pretraining
@dataclass
class PretrainModelConfig(ModelConfig):
    mask_ratio: float = MASK_RATIO
    decoder_depth: int = 1
    decoder_embed_dim: int = 512
    norm_pix_loss: bool = True
    backend: Literal["torch", "minkowski"] = "torch"  # sparse encoder: pure PyTorch, or MinkowskiEngine (optional)


@dataclass
class PretrainDataConfig(DataConfig):
    # demo: images shipped in the package; folder: any folder of images (recursive); imagenet: <path>/train;
    # fashion_mnist: IDX files in `path` (default /usr/share/datasets/fashion-mnist); webdataset: tar shards in
    # `path` (a folder, a brace pattern or a pipe:/URL spec; see fcmae shard); hf: a Hugging Face dataset in `path`
    # (parquet or arrow files, or a save_to_disk folder); hf_stream: parquet files streamed (a folder, a glob or an
    # fsspec URL), exact like shards. The table of sources: fcmae/data/sources.py
    source: str = "imagenet"
    # cpu: workers decode and crop (default); gpu: workers read JPEG bytes and draw the crop, the training device
    # decodes (nvJPEG on CUDA, in one batched call) and crops (folder/imagenet sources; other files on the CPU)
    decode: Literal["cpu", "gpu"] = "cpu"


@dataclass
class PretrainRunConfig(RunConfig):
    output_dir: str = "output/pretrain"
    export_every_epochs: int = 50  # export encoder weights + reconstruction figure every N epochs (and at the end)
    num_vis_images: int = 6


@dataclass
class MonitorConfig:
    """k-NN monitor: top-1 of a weighted k-NN classifier on the encoder's frozen features during pretraining.

    Off unless ``train`` and ``val`` name labelled sets (dataset specs, e.g. ``fashion_mnist:train`` /
    ``fashion_mnist:test``, or class folders). Seeded stratified subsets of ``train_size`` / ``val_size`` images keep
    it cheap; it runs every ``every_epochs`` epochs and/or every ``every_steps`` steps, and at the end.
    """

    train: str = ""  # labelled set of the k-NN memory ("" = monitor off)
    val: str = ""  # labelled set it is scored on
    train_size: int = 2000
    val_size: int = 1000
    every_epochs: int = 1  # 0 = not at epoch ends
    every_steps: int = 0  # 0 = not by steps
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256
    data_root: str = ""  # Fashion-MNIST IDX folder ("" = data.path or the Debian location)


def _check_mask(mask_ratio: float, input_size: int) -> None:
    """The mask must remove at least one cell of the 1/32 grid and keep at least one, and remove exactly the
    documented ``L - int(L * (1 - ratio))`` cells: ``num_kept`` keeps at least one cell, so where
    ``int(L * (1 - ratio))`` is 0 it would silently remove fewer than the ratio says."""
    from fcmae.models.registry import num_kept

    side = input_size // 32
    cells = side * side
    documented = cells - int(cells * (1.0 - mask_ratio))
    removed = cells - num_kept(cells, mask_ratio)
    where = f"the {side}x{side} mask grid of data.input_size={input_size} ({cells} cell{'s' * (cells > 1)})"
    if cells < 2:
        raise ConfigError(f"model.mask_ratio={mask_ratio!r}: {where} cannot both remove a cell and keep one "
                          f"(cells removed: {removed}); use data.input_size >= 64")
    if removed == 0:
        raise ConfigError(f"model.mask_ratio={mask_ratio!r} removes no cell of {where} (cells removed: 0); use a "
                          f"ratio of at least {1 / cells:g}")
    if removed != documented:
        raise ConfigError(f"model.mask_ratio={mask_ratio!r} would remove all {documented} cells of {where}, but "
                          f"one must stay visible (cells removed: {removed}); use a ratio of at most "
                          f"{1 - 1 / cells:g}")


@dataclass
class PretrainConfig:
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: PretrainRunConfig = field(default_factory=PretrainRunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        src = _validate_common(self, "pretrain")
        m, d, r = self.model, self.data, self.run
        _check(0.0 <= m.mask_ratio < 1.0, "model.mask_ratio", m.mask_ratio, "must be in [0, 1)")
        _check(m.decoder_depth >= 0, "model.decoder_depth", m.decoder_depth, "must be >= 0")
        _check(m.decoder_embed_dim >= 1, "model.decoder_embed_dim", m.decoder_embed_dim, "must be >= 1")
        _check_mask(m.mask_ratio, d.input_size)
        _check(d.decode == "cpu" or src.image_files, "data.decode", d.decode,
               "gpu decoding reads image files: use it with data.source=folder or imagenet")
        _check(m.use_grn is not False or m.backend == "torch", "model.use_grn", m.use_grn,
               "must not be false with model.backend=minkowski (that backend has no GRN-free blocks)")
        _check(src.path != "required" or d.path != "", "data.path", d.path, f"is required for data.source={d.source}")
        _check(r.export_every_epochs >= 0, "run.export_every_epochs", r.export_every_epochs, "must be >= 0")
        _check(r.num_vis_images >= 1, "run.num_vis_images", r.num_vis_images, "must be >= 1")
        mo = self.monitor
        _check(bool(mo.train) == bool(mo.val), "monitor.val" if mo.train else "monitor.train",
               mo.val if mo.train else mo.train, "must be set too: the monitor needs both train and val")
        for key in ("train_size", "val_size", "k", "batch_size"):
            _check(getattr(mo, key) >= 1, f"monitor.{key}", getattr(mo, key), "must be >= 1")
        for key in ("every_epochs", "every_steps"):
            _check(getattr(mo, key) >= 0, f"monitor.{key}", getattr(mo, key), "must be >= 0 (0 = off)")
        _check(mo.temperature > 0, "monitor.temperature", mo.temperature, "must be > 0")


# --------------------------------------------------------------------------------------------- fine-tuning
# Defaults follow the official ConvNeXt V2 fine-tuning script (main_finetune.py) with the Base recipe.
@dataclass
class FinetuneModelConfig(ModelConfig):
    drop_path_rate: float = 0.1
    num_classes: int = 0  # 0: the number of classes in the training data
    head_init_scale: float = 0.001  # scales the fresh head of a model trained from scratch (no init)
    init: str = ""  # weights to start from: any checkpoint layout `fcmae convert` reads ("" = random init)
    init_ema: bool = False  # take the EMA weights (model_ema) of an init checkpoint that holds both


@dataclass
class FinetuneDataConfig(DataConfig):
    # imagenet: <path>/train and <path>/val class folders; folder: train_path / val_path class folders;
    # fashion_mnist: train/test IDX files in `path` (default /usr/share/datasets/fashion-mnist); webdataset:
    # labelled tar shards (`cls`) in train_path / val_path (folders, brace patterns or pipe:/URL specs); hf: a
    # Hugging Face dataset: train_path / val_path, or `path` holding the train and validation splits; hf_stream: the
    # same, parquet files streamed
    source: str = "imagenet"
    train_path: str = ""
    val_path: str = ""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    num_workers: int = 8
    crop_pct: float = 0.875  # evaluation: resize the short side to input_size / crop_pct, centre crop (224/256)
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy ("" = none)
    color_jitter: float | None = None  # timm applies it only when auto_augment is ""
    reprob: float = 0.25  # random erasing probability
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = 1
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"
    val_limit: int = 0  # first N validation images only (0 = all)
    # label budget: a seeded, stratified subset of the training set; round(train_fraction * n_c) images of each
    # class c, capped at labels_per_class when that is > 0 (labels_per_class alone: exactly k per class)
    train_fraction: float = 1.0
    labels_per_class: int = 0
    label_seed: int = 0  # seeds the subset (independent of run.seed, so seeds can vary over the same subset)


@dataclass
class MixupConfig:
    mixup: float = 0.8  # mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: Literal["batch", "pair", "elem"] = "batch"
    smoothing: float = 0.1  # label smoothing (soft targets with mixup, LabelSmoothingCrossEntropy without)


@dataclass
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = False  # timm's decay warmup (1 - (1 + step)^-2/3), useful for short runs


@dataclass
class FinetuneOptimConfig(OptimConfig):
    blr: float = 6.25e-4
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 100
    warmup_epochs: float = 20.0
    layer_decay: float = 0.6  # 1.0 = off
    # single: one layer per block (the stem with the first block, as the official optim_factory); group: the
    # official rule for base/large/huge (stage 2 in groups of three blocks); see ConvNeXtV2.group_matcher
    layer_decay_type: Literal["single", "group"] = "group"


@dataclass
class FinetuneRunConfig(RunConfig):
    output_dir: str = "output/finetune"
    batch_size: int = 32
    eval_batch_size: int = 0  # per device (0 = 2 x batch_size)
    eval_every_epochs: int = 1
    linear_probe: bool = False  # train only the head (BatchNorm1d(affine=False) + Linear), trunk frozen


@dataclass
class FinetuneConfig:
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)

    def validate(self) -> None:
        src = _validate_common(self, "finetune")
        m, d, o, x, r = self.model, self.data, self.optim, self.mixup, self.run
        _check(m.num_classes >= 0, "model.num_classes", m.num_classes, "must be >= 0 (0 = from the data)")
        _check(0.0 < d.crop_pct <= 1.0, "data.crop_pct", d.crop_pct, "must be in (0, 1]")
        _check(0.0 <= d.reprob <= 1.0, "data.reprob", d.reprob, "must be in [0, 1]")
        _check(d.recount >= 1, "data.recount", d.recount, "must be >= 1")
        split = d.train_path != "" or d.val_path != "" if src.splits == "either" else src.splits == "split"
        if src.splits == "path" or (src.splits == "either" and not split):
            _check(d.path != "", "data.path", d.path, f"is required for data.source={d.source} (it holds the splits)"
                   + (", or data.train_path and data.val_path" if src.splits == "either" else ""))
        if split:
            _check(d.train_path != "", "data.train_path", d.train_path, f"is required for data.source={d.source}")
            _check(d.val_path != "", "data.val_path", d.val_path, f"is required for data.source={d.source}")
        if src.streamed:
            _check(d.train_fraction == 1.0 and d.labels_per_class == 0 and d.val_limit == 0, "data.train_fraction",
                   (d.train_fraction, d.labels_per_class, d.val_limit),
                   f"label budgets and val_limit are not available with data.source={d.source} (make a subset)")
        _check(0.0 < d.train_fraction <= 1.0, "data.train_fraction", d.train_fraction, "must be in (0, 1]")
        _check(d.labels_per_class >= 0, "data.labels_per_class", d.labels_per_class, "must be >= 0")
        _check(d.val_limit >= 0, "data.val_limit", d.val_limit, "must be >= 0")
        _check(x.mixup >= 0 and x.cutmix >= 0, "mixup.mixup/cutmix", (x.mixup, x.cutmix), "must be >= 0")
        _check(0.0 <= x.smoothing < 1.0, "mixup.smoothing", x.smoothing, "must be in [0, 1)")
        mixing = x.mixup > 0 or x.cutmix > 0 or x.cutmix_minmax is not None
        _check(not mixing or r.batch_size % 2 == 0, "run.batch_size", r.batch_size,
               "must be even when mixup/cutmix is on (timm's Mixup pairs each sample with the flipped batch)")
        _check(0.0 <= self.ema.decay < 1.0, "ema.decay", self.ema.decay, "must be in [0, 1)")
        _check(0.0 < o.layer_decay <= 1.0, "optim.layer_decay", o.layer_decay, "must be in (0, 1] (1 = off)")
        _check(r.eval_batch_size >= 0, "run.eval_batch_size", r.eval_batch_size, "must be >= 0")
        _check(r.eval_every_epochs >= 1, "run.eval_every_epochs", r.eval_every_epochs, "must be >= 1")


# --------------------------------------------------------------------------------------------- resume checks
# keys a resumed run may change freely: they change how a run is watched, saved, paced or where it stops, not what
# is trained. Every other key (model.*, data.*, optim.*, mixup.*, ema.*, run.batch_size, run.accum_iter, run.seed,
# run.mixed_precision, run.linear_probe ...) changes the training, and run.resume=auto refuses a change of it.
TRAINING_KEYS_FREE = frozenset({
    "data.num_workers", "run.output_dir", "run.resume", "run.overwrite", "run.allow_config_change", "run.max_steps",
    "run.save_every_steps", "run.save_every_epochs", "run.keep_last", "run.log_every", "run.threads",
    "run.progress", "run.export_every_epochs", "run.num_vis_images", "run.eval_batch_size", "run.eval_every_epochs",
    "run.compile", "run.compile_backend", "data.file_list", "data.shard_index", "run.dist_timeout_s",
    "run.hang_timeout_s", "data.max_skipped_fraction",
    "run.grad_checkpointing", "run.tf32", "run.cudnn_benchmark", "run.channels_last",
    "run.log_with", "run.run_name", "run.project",
})
TRAINING_PREFIXES_FREE = ("monitor.",)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples stay values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def training_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, old value, new value)]`` for the keys that change what is trained (not in ``TRAINING_KEYS_FREE``)
    and differ between two configs (nested dicts, e.g. ``to_dict(cfg)`` and a saved ``config.yaml``). A key only
    one of them has (a config written by another version) is not a change."""
    a, b = flatten(old), flatten(new)
    # streamed shards are dealt to processes x workers: there the worker count shapes the order of the samples
    from fcmae.data.sources import SOURCES

    shards = b.get("data.source") in SOURCES and SOURCES[b["data.source"]].streamed
    return [(k, a[k], b[k]) for k in a if k in b and a[k] != b[k] and not k.startswith(TRAINING_PREFIXES_FREE)
            and (k not in TRAINING_KEYS_FREE or (shards and k == "data.num_workers"))]


# --------------------------------------------------------------------------------------------- loading
def packaged_configs() -> Path:
    """The folder of YAML configs shipped inside the package (``fcmae/configs``)."""
    return Path(str(importlib.resources.files("fcmae") / "configs"))


def resolve_config_path(name: str | os.PathLike[str]) -> Path:
    """A YAML path as given when it exists, else a config shipped in the package, found by name.

    ``demo``, ``demo.yaml``, ``configs/demo.yaml``, ``pretrain/convnextv2_atto`` and
    ``configs/finetune/fashion_mnist.yaml`` all name packaged configs, so the README's commands work from any
    directory after a plain ``pip install``.
    """
    p = Path(name)
    if p.is_file():
        return p
    rel = p.as_posix()
    rel = rel[len("configs/"):] if rel.startswith("configs/") else rel
    candidate = packaged_configs() / (rel if rel.endswith((".yaml", ".yml")) else f"{rel}.yaml")
    if candidate.is_file():
        return candidate
    shipped = sorted(str(q.relative_to(packaged_configs()).with_suffix("")) for q in packaged_configs().rglob("*.yaml"))
    raise ConfigError(f"config file not found: {name} (not a file, nor a packaged config: {', '.join(shipped)})")


def _omegaconf_message(exc: Exception) -> str:
    """OmegaConf's multi-line message -> ``key: problem`` on one line."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{key}: {first}" if key else first


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file (path or packaged name) <- ``key=value`` overrides; then ``validate()``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(cls)
    if path:
        p = resolve_config_path(path)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(p))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{p}: {_omegaconf_message(exc)}") from None
        except Exception as exc:  # YAML syntax errors, a mapping that is not a mapping ...
            raise ConfigError(f"{p}: not a valid config: {str(exc).splitlines()[0]}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.blr=1e-4)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: {_omegaconf_message(exc)}") from None
    cfg = OmegaConf.to_object(merged)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg  # type: ignore[return-value]


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """A config object from a plain nested dict (e.g. the ``config`` metadata of an export), validated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    cfg.validate()
    return cfg  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def config_yaml(cfg: Any) -> str:
    """The merged config as YAML text."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | os.PathLike[str], note: str = "") -> Path:
    """Write the merged config as YAML (atomically); ``note`` becomes a comment line on top (e.g. the lr used)."""
    from fcmae.weights.files import write_text_atomic

    return write_text_atomic(path, (f"# {note}\n" if note else "") + config_yaml(cfg))
