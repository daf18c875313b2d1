"""The variant registry: one record per ConvNeXt variant (V2 and V1), the only place that lists depths and widths.

Every fact about a variant that more than one layer needs lives here: its stage depths and widths, its block
(ConvNeXt V2's GRN or ConvNeXt V1's LayerScale), the name timm gives it and whether timm builds its MLPs as 1x1
convolutions, the paper's parameter count, and the model-wide names (stem weight, classifier) and default
normalisation statistics. Converters, loaders, configs and data code
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


# ConvNeXt V1's LayerScale initial value (Liu et al. 2022; timm's ``ls_init_value`` default)
V1_LS_INIT = 1e-6


@dataclass(frozen=True)
class Variant:
    """One ConvNeXt variant.

    ``depths``/``dims``: blocks and channels of the four stages. ``use_grn``: the block's MLP has GRN after its
    activation (ConvNeXt V2). ``ls_init_value``: the block scales its output per channel by a learned LayerScale
    ``gamma`` initialised to this value (ConvNeXt V1), None for no LayerScale (V2). ``timm_conv_mlp``: timm builds
    this variant with ``conv_mlp=True`` (MLP weights stored as ``(out, in, 1, 1)`` convs). ``in_timm``: timm has a
    model of this name. ``paper_params_m``: the paper's parameter count in millions (1000-class classifier), None
    where no paper gives one.
    """

    name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    timm_conv_mlp: bool
    in_timm: bool = True
    paper_params_m: float | None = None
    use_grn: bool = True
    ls_init_value: float | None = None

    @property
    def family(self) -> str:
        """``"v2"`` (GRN blocks) or ``"v1"`` (LayerScale blocks)."""
        return "v1" if self.ls_init_value is not None else "v2"


def _v1(name: str, depths: tuple[int, int, int, int], dims: tuple[int, int, int, int], conv_mlp: bool,
        paper_params_m: float | None = None, in_timm: bool = True) -> Variant:
    """A ConvNeXt V1 record: LayerScale blocks without GRN, named as timm names it."""
    return Variant(name, depths, dims, timm_conv_mlp=conv_mlp, paper_params_m=paper_params_m, use_grn=False,
                   ls_init_value=V1_LS_INIT, in_timm=in_timm)


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
    # ConvNeXt V1: tiny ... xlarge from "A ConvNet for the 2020s" (its parameter counts, whole millions); atto ... nano
    # are timm's small models (no paper count)
    _v1("convnext_test", (1, 1, 2, 1), (8, 16, 24, 32), conv_mlp=True, in_timm=False),  # tests' tiny V1
    _v1("convnext_atto", (2, 2, 6, 2), (40, 80, 160, 320), conv_mlp=True),
    _v1("convnext_femto", (2, 2, 6, 2), (48, 96, 192, 384), conv_mlp=True),
    _v1("convnext_pico", (2, 2, 6, 2), (64, 128, 256, 512), conv_mlp=True),
    _v1("convnext_nano", (2, 2, 8, 2), (80, 160, 320, 640), conv_mlp=True),
    _v1("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768), conv_mlp=False, paper_params_m=29.0),
    _v1("convnext_small", (3, 3, 27, 3), (96, 192, 384, 768), conv_mlp=False, paper_params_m=50.0),
    _v1("convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024), conv_mlp=False, paper_params_m=89.0),
    _v1("convnext_large", (3, 3, 27, 3), (192, 384, 768, 1536), conv_mlp=False, paper_params_m=198.0),
    _v1("convnext_xlarge", (3, 3, 27, 3), (256, 512, 1024, 2048), conv_mlp=False, paper_params_m=350.0),
)}


def list_models() -> list[str]:
    """Names of all registered variants."""
    return list(_VARIANTS)


def canonical_name(name: str) -> str:
    """``atto`` -> ``convnextv2_atto`` (a bare size names the V2 variant; V1 ones are spelled ``convnext_atto``);
    unknown names are a ``ValueError`` listing the known ones."""
    key = name if name in _VARIANTS or name.startswith("convnextv2_") else f"convnextv2_{name}"
    if key not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_VARIANTS)}")
    return key


def get_variant(name: str) -> Variant:
    """The record of a variant by name (``convnextv2_atto`` or just ``atto``)."""
    return _VARIANTS[canonical_name(name)]


def variant_of(depths: tuple[int, ...], dims: tuple[int, ...], layer_scale: bool = False) -> str | None:
    """The registered variant with these depths and widths, or None: a V1 one (LayerScale blocks) when
    ``layer_scale``, else a V2 one (V1 and V2 share the shapes of atto ... nano, base and large)."""
    return next((v.name for v in _VARIANTS.values() if v.depths == tuple(depths) and v.dims == tuple(dims)
                 and (v.ls_init_value is not None) == layer_scale), None)


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
