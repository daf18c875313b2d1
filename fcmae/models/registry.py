"""The variant registry: one record per ConvNeXt V2 variant, the only place that lists depths and widths.

Every fact about a variant that more than one layer needs lives here: its stage depths and widths, the name timm
gives it and whether timm builds its MLPs as 1x1 convolutions, the paper's parameter count, and the model-wide
names (stem weight, classifier) and default normalisation statistics. Converters, loaders, configs and data code
read these records instead of restating them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# key of the stem convolution weight ``(C0, in_chans, 4, 4)`` in our dense layout (adapted for other in_chans)
STEM_KEY = "downsample_layers.0.0.weight"
# the classifier's keys in our dense layout (absent in encoder-only weights)
HEAD_KEYS = ("head.weight", "head.bias")
# default normalisation: ImageNet's statistics for RGB; for one channel, the means of the RGB statistics
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
GRAY_MEAN: tuple[float] = (0.449,)
GRAY_STD: tuple[float] = (0.226,)
# the paper's mask ratio (60 % of the 32x32 cells removed): the default of the config and of FCMAE.forward
MASK_RATIO = 0.6


@dataclass(frozen=True)
class Variant:
    """One ConvNeXt V2 variant.

    ``depths``/``dims``: blocks and channels of the four stages. ``timm_conv_mlp``: timm builds this variant with
    ``conv_mlp=True`` (MLP weights stored as ``(out, in, 1, 1)`` convs). ``in_timm``: timm has a model of this name.
    ``paper_params_m``: the paper's parameter count in millions (1000-class classifier), None for ours.
    """

    name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    timm_conv_mlp: bool
    in_timm: bool = True
    paper_params_m: float | None = None


_VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("convnextv2_test", (1, 1, 2, 1), (8, 16, 24, 32), timm_conv_mlp=True, in_timm=False),
    Variant("convnextv2_atto", (2, 2, 6, 2), (40, 80, 160, 320), timm_conv_mlp=True, paper_params_m=3.7),
    Variant("convnextv2_femto", (2, 2, 6, 2), (48, 96, 192, 384), timm_conv_mlp=True, paper_params_m=5.2),
    Variant("convnextv2_pico", (2, 2, 6, 2), (64, 128, 256, 512), timm_conv_mlp=True, paper_params_m=9.1),
    Variant("convnextv2_nano", (2, 2, 8, 2), (80, 160, 320, 640), timm_conv_mlp=True, paper_params_m=15.6),
    Variant("convnextv2_tiny", (3, 3, 9, 3), (96, 192, 384, 768), timm_conv_mlp=False, paper_params_m=28.6),
    Variant("convnextv2_base", (3, 3, 27, 3), (128, 256, 512, 1024), timm_conv_mlp=False, paper_params_m=89.0),
    Variant("convnextv2_large", (3, 3, 27, 3), (192, 384, 768, 1536), timm_conv_mlp=False, paper_params_m=198.0),
    Variant("convnextv2_huge", (3, 3, 27, 3), (352, 704, 1408, 2816), timm_conv_mlp=False, paper_params_m=660.0),
)}


def list_models() -> list[str]:
    """Names of all registered variants."""
    return list(_VARIANTS)


def canonical_name(name: str) -> str:
    """``atto`` -> ``convnextv2_atto``; unknown names are a ``ValueError`` listing the known ones."""
    key = name if name.startswith("convnextv2_") else f"convnextv2_{name}"
    if key not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_VARIANTS)}")
    return key


def get_variant(name: str) -> Variant:
    """The record of a variant by name (``convnextv2_atto`` or just ``atto``)."""
    return _VARIANTS[canonical_name(name)]


def variant_of(depths: tuple[int, ...], dims: tuple[int, ...]) -> str | None:
    """The registered variant with these depths and widths, or None."""
    return next((v.name for v in _VARIANTS.values() if v.depths == tuple(depths) and v.dims == tuple(dims)), None)


def mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default normalisation for ``in_chans`` input channels: ImageNet's for RGB, their channel means for one
    channel, and the gray statistics repeated for any other count."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return GRAY_MEAN * in_chans, GRAY_STD * in_chans


# timm's names of the stem conv and the classifier (``stem.0``, ``head.fc``), for records in timm's layout
TIMM_FIRST_CONV, TIMM_CLASSIFIER = "stem.0", "head.fc"
# the evaluation transform the official fine-tuning and timm use for ConvNeXt V2 at 224 px (resize to size /
# crop_pct, bicubic, centre crop)
CROP_PCT, INTERPOLATION = 0.875, "bicubic"


def pretrained_cfg(in_chans: int = 3, num_classes: int = 1000, image_size: int = 224, crop_pct: float = CROP_PCT,
                   layout: str = "dense") -> dict[str, Any]:
    """The model's data and head record in timm's ``pretrained_cfg`` shape (what ``timm.data.resolve_data_config``
    and ``model.get_classifier`` users read): input size, pool size, crop, interpolation, mean/std, first conv and
    classifier names, num_classes. ``layout``: ``"dense"`` names our modules (``ConvNeXtV2.pretrained_cfg``),
    ``"timm"`` timm's (the exported timm folder's ``config.json``). The same for every variant (timm's are too)."""
    if layout not in ("dense", "timm"):
        raise ValueError(f"layout must be 'dense' or 'timm', got {layout!r}")
    mean, std = mean_std(in_chans)
    dense = layout == "dense"
    return {
        "num_classes": num_classes, "input_size": (in_chans, image_size, image_size),
        "pool_size": (image_size // 32, image_size // 32), "crop_pct": crop_pct, "crop_mode": "center",
        "interpolation": INTERPOLATION, "mean": tuple(mean), "std": tuple(std),
        "first_conv": STEM_KEY.rsplit(".", 1)[0] if dense else TIMM_FIRST_CONV,
        "classifier": HEAD_KEYS[0].rsplit(".", 1)[0] if dense else TIMM_CLASSIFIER,
        "fixed_input_size": False, "custom_load": False,
    }


def num_kept(num_cells: int, mask_ratio: float) -> int:
    """Number of visible cells per image: ``int(L * (1 - mask_ratio))``, at least 1 (pure Python: the config checks
    it without importing torch)."""
    check_mask_ratio(mask_ratio)
    return max(1, int(num_cells * (1.0 - mask_ratio)))


def check_mask_ratio(mask_ratio: float) -> None:
    if not (0.0 <= float(mask_ratio) < 1.0):
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
