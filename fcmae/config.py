"""Typed configuration: dataclasses with the paper's defaults, YAML files, ``key=value`` overrides.

A config is a tree of dataclasses. ``load_config(PretrainConfig, "configs/demo.yaml", ["optim.blr=1e-4"])``
starts from the defaults, applies the YAML file, then the overrides (values parsed as YAML scalars), and
validates every field's type and range. Unknown keys and bad values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


# --------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    name: str = "convnextv2_base"
    in_chans: int = 3
    mask_ratio: float = 0.6
    decoder_depth: int = 1
    decoder_embed_dim: int = 512
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0


@dataclass
class DataConfig:
    # demo: images shipped in the package; folder: any folder of images (recursive); imagenet: <path>/train;
    # fashion_mnist: IDX files in `path` (default /usr/share/datasets/fashion-mnist)
    source: Literal["demo", "folder", "imagenet", "fashion_mnist"] = "imagenet"
    path: str = ""
    input_size: int = 224
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    num_workers: int = 2
    on_bad_image: Literal["skip", "error"] = "skip"
    limit: int = 0  # use only the first N images (0 = all), for quick experiments


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 800
    warmup_epochs: float = 40.0
    clip_grad: float | None = None


@dataclass
class RunConfig:
    output_dir: str = "output/pretrain"
    batch_size: int = 64  # per device
    accum_iter: int = 1  # gradient accumulation steps
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "auto"  # auto: bf16 on GPUs that support it, else no
    resume: str = ""  # "", "auto" (newest complete checkpoint in output_dir) or a checkpoint directory
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    save_every_steps: int = 0  # also checkpoint every N optimizer steps (0 = epoch ends only)
    keep_last: int = 2
    export_every_epochs: int = 50  # export encoder weights + reconstruction figure every N epochs (and at the end)
    log_every: int = 10
    num_vis_images: int = 6
    threads: int = 0  # torch intra-op threads on CPU (0 = library default)
    progress: bool = True


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        from fcmae.models.convnextv2 import get_variant

        try:
            get_variant(self.model.name)
        except ValueError as exc:
            raise ConfigError(f"model.name: {exc}") from None
        _check(0.0 <= self.model.mask_ratio < 1.0, "model.mask_ratio", self.model.mask_ratio, "must be in [0, 1)")
        _check(self.model.in_chans >= 1, "model.in_chans", self.model.in_chans, "must be >= 1")
        _check(self.data.input_size > 0 and self.data.input_size % 32 == 0, "data.input_size",
               self.data.input_size, "must be a positive multiple of 32")
        lo, hi = self.data.crop_scale
        _check(0.0 < lo <= hi <= 1.0, "data.crop_scale", self.data.crop_scale, "needs 0 < min <= max <= 1")
        _check(self.data.source == "demo" or self.data.path != "" or self.data.source == "fashion_mnist",
               "data.path", self.data.path, f"is required for data.source={self.data.source}")
        _check(self.run.batch_size >= 1, "run.batch_size", self.run.batch_size, "must be >= 1")
        _check(self.run.accum_iter >= 1, "run.accum_iter", self.run.accum_iter, "must be >= 1")
        _check(self.optim.epochs >= 1, "optim.epochs", self.optim.epochs, "must be >= 1")
        _check(self.optim.blr > 0 or (self.optim.lr or 0) > 0, "optim.blr", self.optim.blr, "must be > 0")
        _check(self.run.keep_last >= 1, "run.keep_last", self.run.keep_last, "must be >= 1")


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {why}")


# --------------------------------------------------------------------------------------------- machinery
def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            value = {False: "no", True: "yes"}[value]  # YAML 1.1 reads a bare no/yes as a bool
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
            value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must have {len(args)} items")
        item_types = [args[0]] * len(value) if (args and args[-1] is Ellipsis) else list(args)
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; known keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def set_override(cfg: Any, item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.blr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    value = yaml.safe_load(raw) if raw.strip() != "" else ""
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    _apply(cfg, nested)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file <- ``key=value`` overrides; then ``validate()``."""
    cfg = cls()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        try:
            _apply(cfg, data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    for item in overrides or []:
        set_override(cfg, item)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the merged config as YAML (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


# --------------------------------------------------------------------------------------------- fine-tuning
# Defaults follow the official ConvNeXt V2 fine-tuning script (main_finetune.py) with the Base recipe.
@dataclass
class FinetuneModelConfig:
    name: str = "convnextv2_base"
    in_chans: int = 3
    num_classes: int = 0  # 0: the number of classes in the training data
    drop_path_rate: float = 0.1
    head_init_scale: float = 0.001  # scales the fresh head of a model trained from scratch (no init)
    init: str = ""  # weights to start from: any checkpoint layout `fcmae convert` reads ("" = random init)


@dataclass
class FinetuneDataConfig:
    # imagenet: <path>/train and <path>/val class folders; folder: train_path / val_path class folders;
    # fashion_mnist: train/test IDX files in `path` (default /usr/share/datasets/fashion-mnist)
    source: Literal["imagenet", "folder", "fashion_mnist"] = "imagenet"
    path: str = ""
    train_path: str = ""
    val_path: str = ""
    input_size: int = 224
    crop_pct: float = 0.875  # evaluation: resize the short side to input_size / crop_pct, centre crop (224/256)
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy ("" = none)
    color_jitter: float | None = None  # timm applies it only when auto_augment is ""
    reprob: float = 0.25  # random erasing probability
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = 1
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"
    num_workers: int = 8
    on_bad_image: Literal["skip", "error"] = "skip"
    limit: int = 0  # first N training images only (0 = all), for quick experiments; applied before the budget
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
class FinetuneOptimConfig:
    blr: float = 6.25e-4  # lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 100
    warmup_epochs: float = 20.0
    layer_decay: float = 0.6  # 1.0 = off
    layer_decay_type: Literal["single", "group"] = "group"
    clip_grad: float | None = None


@dataclass
class FinetuneRunConfig:
    output_dir: str = "output/finetune"
    batch_size: int = 32  # per device
    eval_batch_size: int = 0  # per device (0 = 2 x batch_size)
    accum_iter: int = 1
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "auto"
    resume: str = ""  # "", "auto" or a checkpoint directory
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    save_every_steps: int = 0
    keep_last: int = 2
    eval_every_epochs: int = 1
    log_every: int = 10
    threads: int = 0
    progress: bool = True
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
        from fcmae.models.convnextv2 import get_variant

        try:
            get_variant(self.model.name)
        except ValueError as exc:
            raise ConfigError(f"model.name: {exc}") from None
        m, d, o, x, r = self.model, self.data, self.optim, self.mixup, self.run
        _check(m.in_chans in (1, 3), "model.in_chans", m.in_chans, "must be 1 or 3 for image data")
        _check(m.num_classes >= 0, "model.num_classes", m.num_classes, "must be >= 0 (0 = from the data)")
        _check(0.0 <= m.drop_path_rate < 1.0, "model.drop_path_rate", m.drop_path_rate, "must be in [0, 1)")
        _check(d.input_size > 0 and d.input_size % 32 == 0, "data.input_size", d.input_size,
               "must be a positive multiple of 32")
        _check(0.0 < d.crop_pct <= 1.0, "data.crop_pct", d.crop_pct, "must be in (0, 1]")
        lo, hi = d.scale
        _check(0.0 < lo <= hi <= 1.0, "data.scale", d.scale, "needs 0 < min <= max <= 1")
        _check(0.0 <= d.reprob <= 1.0, "data.reprob", d.reprob, "must be in [0, 1]")
        if d.source == "imagenet":
            _check(d.path != "", "data.path", d.path, "is required for data.source=imagenet (<path>/train, /val)")
        if d.source == "folder":
            _check(d.train_path != "", "data.train_path", d.train_path, "is required for data.source=folder")
            _check(d.val_path != "", "data.val_path", d.val_path, "is required for data.source=folder")
        _check(0.0 < d.train_fraction <= 1.0, "data.train_fraction", d.train_fraction, "must be in (0, 1]")
        _check(d.labels_per_class >= 0, "data.labels_per_class", d.labels_per_class, "must be >= 0")
        _check(d.limit >= 0 and d.val_limit >= 0, "data.limit", (d.limit, d.val_limit), "must be >= 0")
        _check(x.mixup >= 0 and x.cutmix >= 0, "mixup.mixup/cutmix", (x.mixup, x.cutmix), "must be >= 0")
        _check(0.0 <= x.smoothing < 1.0, "mixup.smoothing", x.smoothing, "must be in [0, 1)")
        mixing = x.mixup > 0 or x.cutmix > 0 or x.cutmix_minmax is not None
        _check(not mixing or r.batch_size % 2 == 0, "run.batch_size", r.batch_size,
               "must be even when mixup/cutmix is on (timm's Mixup pairs each sample with the flipped batch)")
        _check(0.0 <= self.ema.decay < 1.0, "ema.decay", self.ema.decay, "must be in [0, 1)")
        _check(o.epochs >= 1, "optim.epochs", o.epochs, "must be >= 1")
        _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
        _check(o.blr > 0 or (o.lr or 0) > 0, "optim.blr", o.blr, "must be > 0")
        _check(0.0 < o.layer_decay <= 1.0, "optim.layer_decay", o.layer_decay, "must be in (0, 1] (1 = off)")
        _check(r.batch_size >= 1, "run.batch_size", r.batch_size, "must be >= 1")
        _check(r.eval_batch_size >= 0, "run.eval_batch_size", r.eval_batch_size, "must be >= 0")
        _check(r.accum_iter >= 1, "run.accum_iter", r.accum_iter, "must be >= 1")
        _check(r.keep_last >= 1, "run.keep_last", r.keep_last, "must be >= 1")
        _check(r.eval_every_epochs >= 1, "run.eval_every_epochs", r.eval_every_epochs, "must be >= 1")
