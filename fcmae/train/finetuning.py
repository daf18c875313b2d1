"""The fine-tuning recipe: supervised training of a dense ConvNeXt V2, the official ConvNeXt V2 recipe.

What differs from any other run (the loop itself is :class:`fcmae.train.trainer.Trainer`'s): a dense classifier
initialised from any checkpoint (:func:`fcmae.weights.load_weights`); labelled data with a label budget; layer-wise
lr decay from the model's ``group_matcher`` (timm's ``param_groups_layer_decay``); Mixup/CutMix with label smoothing,
EMA (timm's ``Mixup``, ``SoftTargetCrossEntropy``, ``LabelSmoothingCrossEntropy``, ``ModelEmaV3``); evaluation of the
model and its EMA at epoch ends, keeping the best. ``run.linear_probe`` trains only a BatchNorm + Linear head.

Outputs in ``run.output_dir`` besides the trainer's: ``best.safetensors`` (the best evaluated weights, model or EMA,
our dense layout), ``last.safetensors`` and ``last_ema.safetensors`` (the final weights).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fcmae.config import EmaConfig, FinetuneConfig, MixupConfig, to_dict
from fcmae.data.sampling import Sample, ignore_stop_signals
from fcmae.data.transforms import DeviceNormalize, DeviceRandomErasing
from fcmae.models.registry import mean_std
from fcmae.train.recipe import RecipeBase, RecipeParts, StepHook, TrainContext
from fcmae.train.trainer import Trainer, param_groups


# ------------------------------------------------------------------------------------------- pieces
def enable_linear_probe(model: nn.Module) -> None:
    """Freeze everything but the head and put a ``BatchNorm1d(affine=False)`` in front of it, as MAE's linear
    probing does (the features' scale differs a lot between pretrained encoders; BN makes one lr fit all).
    The trunk runs in eval mode during training (see ``FinetuneRecipe.train_mode``): no drop path in it."""
    if not isinstance(model.head, nn.Linear):
        raise ValueError("linear probing needs a Linear head (num_classes > 0)")
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.head
    head.requires_grad_(True)
    bn = nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6).to(head.weight.device)
    model.head = nn.Sequential(bn, head)


def export_classifier(model: nn.Module | Mapping[str, Tensor], path: Path, metadata: Mapping[str, Any]) -> Path:
    """Write the classifier's dense weights (a module, or its whole state dict gathered by
    ``fcmae.train.sharding.full_state_dict``; a linear-probe head folded into one Linear) + string metadata as
    safetensors (atomically)."""
    from fcmae.weights.files import save_state_dict
    from fcmae.weights.loader import fold_probe_head

    state = model if isinstance(model, Mapping) else model.state_dict()
    sd = fold_probe_head({k: v.detach().cpu() for k, v in state.items()})
    return save_state_dict(path, sd, {k: str(v) for k, v in metadata.items()})


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
    for m in ema.modules():  # a deep copy of a compiled module (run.compile) would call the original's forward
        m._compiled_call_impl = None
    return ema


@dataclass
class BestResult:
    """The best evaluation so far, saved with every checkpoint."""

    top1: float = -1.0
    top5: float = -1.0
    epoch: int = -1
    source: str = ""  # "model" or "ema"
    evaluated_at: int = -1  # optimizer step of the last evaluation

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if hasattr(self, k):
                setattr(self, k, type(getattr(self, k))(v))


# ------------------------------------------------------------------------------------------- the recipe
class FinetuneRecipe(RecipeBase):
    name = "finetune"

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.best = BestResult()
        self.ema: nn.Module | None = None
        self.init_info: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] = {}

    def setup(self) -> RecipeParts:
        from fcmae.data import build_finetune_data
        from fcmae.models.convnextv2 import build_convnextv2
        from fcmae.weights.loader import load_weights

        cfg, m, o = self.cfg, self.cfg.model, self.cfg.optim
        self.data = build_finetune_data(cfg.data, m.in_chans, cfg.run.seed)
        self.num_classes = m.num_classes or len(self.data.classes)
        if self.num_classes < len(self.data.classes):
            raise ValueError(f"model.num_classes={self.num_classes} but the data has {len(self.data.classes)} classes")
        model = build_convnextv2(m.name, num_classes=self.num_classes, in_chans=m.in_chans,
                                 drop_path_rate=m.drop_path_rate, head_init_scale=m.head_init_scale, use_grn=m.use_grn)
        self.init_info = load_weights(model, m.init, m.init_ema) if m.init else None
        if cfg.run.linear_probe:
            enable_linear_probe(model)
        model.layer_decay_type = o.layer_decay_type  # the rule timm's layer decay reads off group_matcher
        model.set_grad_checkpointing(cfg.run.grad_checkpointing)
        self.mixup_fn, self.criterion = build_mixup_and_loss(cfg.mixup, self.num_classes)
        self.normalize = DeviceNormalize(*mean_std(m.in_chans))
        self.erase = DeviceRandomErasing(cfg.data.reprob, cfg.data.remode, cfg.data.recount)
        return RecipeParts(model, self.data.train, param_groups(model, o.weight_decay, o.layer_decay))

    def after_prepare(self, ctx: TrainContext) -> None:
        run, acc, val = self.cfg.run, ctx.accelerator, self.data.val
        batch, workers = run.eval_batch_size or 2 * run.batch_size, self.cfg.data.num_workers
        opts = {"num_workers": workers, "pin_memory": torch.cuda.is_available(), "worker_init_fn": ignore_stop_signals}
        # shards: each process evaluates its own shards (no accelerate splitting; sums are reduced once at the end)
        self.val_split = isinstance(val, torch.utils.data.IterableDataset)
        if self.val_split:
            val.configure(acc.process_index, acc.num_processes, batch, workers)
            self.val_loader = torch.utils.data.DataLoader(val, batch_size=batch, **opts)
        else:
            self.val_loader = acc.prepare(torch.utils.data.DataLoader(val, batch_size=batch, shuffle=False,
                                                                      drop_last=False, **opts))
        self.ema = build_ema(ctx.unwrapped, self.cfg.ema)  # after prepare: on the training device

    def stateful(self) -> list[Any]:
        return [self.best] + ([self.ema] if self.ema is not None else [])

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()``; for linear probing everything but the head goes back to eval mode."""
        model.train()
        if self.cfg.run.linear_probe:
            for name, child in model.named_children():
                if name != "head":
                    child.eval()

    def loss(self, model: nn.Module, batch: Sample) -> Tensor:
        """batch: images ``(B, C, H, W)`` uint8, target = labels ``(B,)`` int64; Mixup/CutMix makes soft targets."""
        # uint8 from the workers: normalised and randomly erased on the device, as timm's transform would per image
        images, targets = self.erase(self.normalize(batch.image)), batch.target
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)  # targets: (B, num_classes) soft
        return self.criterion(model(images), targets)

    def after_step(self, ctx: TrainContext) -> None:
        if self.ema is not None:
            self.ema.update(ctx.unwrapped, step=ctx.state.step)

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> None:
        st, every = ctx.state, self.cfg.run.eval_every_epochs
        if st.epoch % every == 0 or st.step >= ctx.schedule.last_step:
            self.evaluate(ctx, epoch + 1)

    def _metadata(self, ctx: TrainContext) -> dict[str, Any]:
        m, d = self.cfg.model, self.cfg.data
        return {"format": "fcmae-classifier", "layout": "dense", "variant": m.name, "in_chans": m.in_chans,
                "num_classes": self.num_classes, "image_size": d.input_size, "crop_pct": d.crop_pct,
                "classes": json.dumps(self.data.classes), "config": json.dumps(to_dict(self.cfg)),
                "epoch": ctx.state.epoch_number, "step": ctx.state.step}

    def _gathered(self, ctx: TrainContext, source: str) -> dict[str, Tensor]:
        """The whole weights of the model or its EMA (``fcmae.train.sharding.full_state_dict``; every process)."""
        from fcmae.train.sharding import full_state_dict

        if source == "ema":
            assert self.ema is not None
            return full_state_dict(self.ema.module)
        return full_state_dict(ctx.model, ctx.accelerator)

    def evaluate(self, ctx: TrainContext, epoch: int) -> None:
        """Evaluate the model (and its EMA) after ``epoch`` (counted from 1), log it, keep the best as
        ``best.safetensors``."""
        from fcmae.evaluation.accuracy import evaluate

        acc, st, progress = ctx.accelerator, ctx.state, self.cfg.run.progress
        opts = {"prepare": self.normalize, "split": self.val_split}
        res = evaluate(ctx.model, self.val_loader, acc, f"eval {epoch}", progress, **opts)
        rec: dict[str, Any] = {"step": st.step, "epoch": epoch, "val_top1": res["top1"], "val_top5": res["top5"],
                               "val_loss": res["loss"]}
        cands = [("model", res)]
        if self.ema is not None:
            res_e = evaluate(self.ema.module, self.val_loader, acc, f"eval ema {epoch}", progress, **opts)
            rec.update(ema_top1=res_e["top1"], ema_top5=res_e["top5"], ema_loss=res_e["loss"])
            cands.append(("ema", res_e))
        source, best_res = max(cands, key=lambda c: c[1]["top1"])
        b = self.best
        if best_res["top1"] > b.top1:  # the same on every process (evaluate reduces its sums)
            b.top1, b.top5, b.epoch, b.source = best_res["top1"], best_res["top5"], epoch, source
            weights = self._gathered(ctx, source)  # every process takes part
            if acc.is_main_process:
                export_classifier(weights, ctx.out_dir / "best.safetensors",
                                  {**self._metadata(ctx), "weights": source, "epoch": epoch,
                                   "top1": f"{b.top1:.4f}", "top5": f"{b.top5:.4f}"})
        b.evaluated_at = st.step
        rec.update(best_top1=b.top1, best_source=b.source)
        ctx.log({"type": "eval", **rec})
        ema_txt = f"; EMA top-1 {rec['ema_top1']:.2f} top-5 {rec['ema_top5']:.2f}" if self.ema is not None else ""
        ctx.say(f"eval after epoch {epoch} (step {st.step}): top-1 {res['top1']:.2f} top-5 {res['top5']:.2f} "
                    f"loss {res['loss']:.4f}{ema_txt}; best {b.top1:.2f} ({b.source})")
        self.last_eval = rec

    def describe(self, ctx: TrainContext) -> list[str]:
        cfg, m, acc = self.cfg, self.cfg.model, ctx.accelerator
        lines = [f"fcmae finetune: {m.name}, {self.num_classes} classes, input {cfg.data.input_size}x"
                 f"{cfg.data.input_size}, in_chans {m.in_chans}, {acc.num_processes} process(es) on {acc.device}, "
                 f"mixed precision {ctx.mixed_precision}",
                 f"data: {cfg.data.source}; {self.data.describe_budget(cfg.data)}; {len(self.data.val)} validation "
                 "images"]
        info = self.init_info
        if info is not None and ctx.resumed_from is None:
            lines.append(f"init: {m.init} ({info['layout']} layout, {info['variant_in_file']})"
                         + (", stem adapted to in_chans" if info["adapted_stem"] else ""))
            if info["fresh"]:
                why = " (head re-initialised: trunc normal std 2e-5, zero bias)" if info["head_reset"] else ""
                lines.append(f"initialised fresh (not in the checkpoint): {', '.join(info['fresh'])}{why}")
        elif info is None:
            lines.append("init: none (random weights; set model.init or --init to fine-tune pretrained weights)")
        o = cfg.optim
        if o.layer_decay < 1.0:
            scales = sorted({g["lr_scale"] for g in ctx.optimizer.param_groups})
            lines.append(f"layer decay {o.layer_decay_type} {o.layer_decay:g}: {len(scales)} layers, lr scales "
                         f"{scales[0]:.3g} .. {scales[-1]:.3g}")
        mixing = "Mixup/CutMix" if self.mixup_fn is not None else "no Mixup/CutMix"
        lines.append(f"{mixing}, label smoothing {cfg.mixup.smoothing:g}, loss {type(self.criterion).__name__}; EMA "
                     f"{'decay ' + format(cfg.ema.decay, 'g') if self.ema is not None else 'off'}"
                     + ("; linear probe (trunk frozen)" if cfg.run.linear_probe else ""))
        return lines

    def finish(self, ctx: TrainContext) -> dict[str, Any]:
        st, out = ctx.state, ctx.out_dir
        if self.best.evaluated_at != st.step:  # stopped mid-epoch (max_steps) or resumed a finished run
            self.evaluate(ctx, st.epoch_number)
        meta = self._metadata(ctx)
        for source, name in [("model", "last")] + ([("ema", "last_ema")] if self.ema is not None else []):
            weights = self._gathered(ctx, source)  # every process takes part
            if ctx.is_main_process:
                export_classifier(weights, out / f"{name}.safetensors", {**meta, "weights": source})
        e, b = self.last_eval, self.best
        return {"train_images": len(self.data.train), "num_classes": self.num_classes,
                "val_top1": e.get("val_top1"), "val_top5": e.get("val_top5"), "ema_top1": e.get("ema_top1"),
                "ema_top5": e.get("ema_top5"), "best_top1": b.top1, "best_top5": b.top5, "best_epoch": b.epoch,
                "best_source": b.source, "best": str(out / "best.safetensors"), "last": str(out / "last.safetensors")}


def run_finetuning(cfg: FinetuneConfig, hooks: Sequence[StepHook] = ()) -> dict[str, Any]:
    """Fine-tune as configured; returns the summary (paths, accuracies, throughput)."""
    return Trainer(cfg, FinetuneRecipe(cfg), hooks).fit()
