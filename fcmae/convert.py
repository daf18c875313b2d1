"""Pure ``state_dict -> state_dict`` conversions between checkpoint layouts.

Layouts:
- ``dense``: ours (``fcmae.create_model``): ``downsample_layers.*``, ``stages.i.j.{dwconv,norm,pwconv1,grn,pwconv2}``,
  ``norm``, ``head``; GRN ``gamma``/``beta`` of shape ``(4C,)``.
- ``timm``: ``timm.create_model('convnextv2_*')``: ``stem.*``, ``stages.i.downsample.*``,
  ``stages.i.blocks.j.{conv_dw,norm,mlp.fc1,mlp.grn,mlp.fc2}``, ``head.norm``, ``head.fc``. The small variants
  (atto ... nano) use 1x1 convolutions for the MLP, so ``fc1``/``fc2`` weights are ``(out, in, 1, 1)`` there.
"""

from __future__ import annotations

import re

from torch import Tensor

from fcmae.models.convnextv2 import canonical_name

StateDict = dict[str, Tensor]

# timm builds these variants with conv_mlp=True (1x1 conv MLP weights)
_TIMM_CONV_MLP = {"convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano", "convnextv2_test"}

_BLOCK_DENSE_TO_TIMM = {
    "dwconv": "conv_dw",
    "norm": "norm",
    "pwconv1": "mlp.fc1",
    "grn.gamma": "mlp.grn.weight",
    "grn.beta": "mlp.grn.bias",
    "pwconv2": "mlp.fc2",
}
_BLOCK_TIMM_TO_DENSE = {v: k for k, v in _BLOCK_DENSE_TO_TIMM.items()}
_DENSE_BLOCK_RE = r"stages\.(\d+)\.(\d+)\.(dwconv|norm|pwconv1|pwconv2|grn\.gamma|grn\.beta)(\.weight|\.bias)?"


class ConversionError(ValueError):
    """A checkpoint could not be converted; the message names the offending keys or shapes."""


def _fail_unplaced(keys: list[str], what: str) -> None:
    if keys:
        shown = ", ".join(sorted(keys)[:20]) + (" ..." if len(keys) > 20 else "")
        raise ConversionError(f"{len(keys)} key(s) cannot be placed in the {what} layout: {shown}")


def dense_to_timm(state_dict: StateDict, model_name: str) -> StateDict:
    """Our dense layout -> timm's ``convnextv2_*`` layout (MLP weights shaped as timm's variant expects)."""
    name = canonical_name(model_name)
    conv_mlp = name in _TIMM_CONV_MLP
    out: StateDict = {}
    unplaced: list[str] = []
    for key, t in state_dict.items():
        if m := re.fullmatch(r"downsample_layers\.0\.([01])\.(weight|bias)", key):
            new = f"stem.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"downsample_layers\.([123])\.([01])\.(weight|bias)", key):
            new = f"stages.{m[1]}.downsample.{m[2]}.{m[3]}"
        elif m := re.fullmatch(_DENSE_BLOCK_RE, key):
            new = f"stages.{m[1]}.blocks.{m[2]}.{_BLOCK_DENSE_TO_TIMM[m[3]]}{m[4] or ''}"
            if conv_mlp and m[3] in ("pwconv1", "pwconv2") and m[4] == ".weight":
                t = t.reshape(*t.shape, 1, 1)
        elif m := re.fullmatch(r"norm\.(weight|bias)", key):
            new = f"head.norm.{m[1]}"
        elif m := re.fullmatch(r"head\.(weight|bias)", key):
            new = f"head.fc.{m[1]}"
        else:
            unplaced.append(key)
            continue
        out[new] = t
    _fail_unplaced(unplaced, "timm")
    return out


def timm_to_dense(state_dict: StateDict) -> StateDict:
    """timm's ``convnextv2_*`` layout -> our dense layout (1x1 conv MLP weights flattened to Linear weights)."""
    out: StateDict = {}
    unplaced: list[str] = []
    for key, t in state_dict.items():
        if m := re.fullmatch(r"stem\.([01])\.(weight|bias)", key):
            new = f"downsample_layers.0.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"stages\.([123])\.downsample\.([01])\.(weight|bias)", key):
            new = f"downsample_layers.{m[1]}.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc1|mlp\.fc2|mlp\.grn\.weight|"
                               r"mlp\.grn\.bias)(\.weight|\.bias)?", key):
            new = f"stages.{m[1]}.{m[2]}.{_BLOCK_TIMM_TO_DENSE[m[3]]}{m[4] or ''}"
            if m[3] in ("mlp.fc1", "mlp.fc2") and m[4] == ".weight" and t.ndim == 4:
                t = t.reshape(t.shape[0], t.shape[1])
        elif m := re.fullmatch(r"head\.norm\.(weight|bias)", key):
            new = f"norm.{m[1]}"
        elif m := re.fullmatch(r"head\.fc\.(weight|bias)", key):
            new = f"head.{m[1]}"
        else:
            unplaced.append(key)
            continue
        out[new] = t
    _fail_unplaced(unplaced, "dense")
    return out
