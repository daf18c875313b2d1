"""Pure ``state_dict -> state_dict`` conversions between checkpoint layouts.

Layouts (``detect_layout`` names):
- ``dense``: ours (``fcmae.create_model``): ``downsample_layers.*``, ``stages.i.j.{dwconv,norm,pwconv1,grn,pwconv2}``,
  ``norm``, ``head``; GRN ``gamma``/``beta`` of shape ``(4C,)``. ConvNeXt V1 variants have no ``grn`` but a
  LayerScale ``stages.i.j.gamma`` ``(C,)``: exactly the official ConvNeXt V1 code's names and shapes
  (facebookresearch/ConvNeXt ``convnext_*_1k_224.pth``, whose ``{"model": ...}`` wrapper the file reader unwraps),
  so official V1 checkpoints are this layout.
- ``fcmae``: our pretraining checkpoint (``fcmae.models.fcmae.FCMAE``): the dense names under ``encoder.`` (no final
  ``norm``/``head``), plus the decoder: ``proj.*``, ``mask_token``, ``decoder.*``, ``pred.*``.
- ``official_sparse``: the official FCMAE checkpoint with its MinkowskiEngine encoder, under ``encoder.``: the stem is
  dense (``downsample_layers.0.{0,1}.weight/bias``); downsample layers 1-3 are ``.0.ln.*`` (LayerNorm) and
  ``.1.kernel`` ``(4, C_in, C_out)`` / ``.1.bias`` ``(1, C_out)``; blocks hold ``dwconv.kernel`` ``(k*k, C)``,
  ``dwconv.bias`` ``(1, C)``, ``norm.ln.*``, ``pwconv{1,2}.linear.*``, ``grn.gamma/beta`` ``(1, 4C)``; plus the
  official decoder (same top-level names as ours).
- ``official_dense``: the official dense ConvNeXt V2 (same names as ours, GRN ``(1, 1, 1, 4C)``), possibly under
  ``encoder.`` (with a decoder) and/or a ``module.`` wrapper prefix, with or without ``norm``/``head``: the released
  fine-tuned weights (``convnextv2_<v>_1k_224_ema.pt``) and the official fine-tuning trainer's ``checkpoint-N.pth``.
- ``official_fcmae``: the released FCMAE weights (``convnextv2_<v>_1k_224_fcmae.pt``): our dense names and shapes
  with no ``encoder.`` prefix, GRN ``gamma``/``beta`` of shape ``(1, 4C)``, no final ``norm``/``head``; official
  decoder keys may be present (dropped).
- ``timm``: ``timm.create_model('convnextv2_*')``: ``stem.*``, ``stages.i.downsample.*``,
  ``stages.i.blocks.j.{conv_dw,norm,mlp.fc1,mlp.grn,mlp.fc2}``, ``head.norm``, ``head.fc``; ``convnext_*`` (V1) has
  ``stages.i.blocks.j.gamma`` instead of ``mlp.grn``. The small variants (atto ... nano) use 1x1 convolutions for
  the MLP, so ``fc1``/``fc2`` weights are ``(out, in, 1, 1)`` there.
- ``transformers``: Hugging Face ``ConvNextV2Model`` / ``ConvNextV2ForImageClassification`` (``convnextv2.`` prefix
  and ``classifier``): ``embeddings.{patch_embeddings,layernorm}``, ``encoder.stages.i.downsampling_layer.{0,1}``,
  ``encoder.stages.i.layers.j.{dwconv,layernorm,pwconv1,grn,pwconv2}``, ``layernorm``; GRN ``weight``/``bias``
  of shape ``(1, 1, 1, 4C)``.

Densifying drops decoder keys; any other key that has no place in the target layout is an error that lists it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fcmae.models.registry import STEM_KEY, canonical_name, get_variant, list_models, variant_of

StateDict = dict[str, Tensor]

_BLOCK_DENSE_TO_TIMM = {
    "dwconv": "conv_dw",
    "norm": "norm",
    "pwconv1": "mlp.fc1",
    "grn.gamma": "mlp.grn.weight",
    "grn.beta": "mlp.grn.bias",
    "pwconv2": "mlp.fc2",
    "gamma": "gamma",  # ConvNeXt V1's LayerScale
}
_BLOCK_TIMM_TO_DENSE = {v: k for k, v in _BLOCK_DENSE_TO_TIMM.items()}
_DENSE_BLOCK_RE = r"stages\.(\d+)\.(\d+)\.(dwconv|norm|pwconv1|pwconv2|grn\.gamma|grn\.beta|gamma)(\.weight|\.bias)?"


class ConversionError(ValueError):
    """A checkpoint could not be converted; the message names the offending keys or shapes."""


def _fail_unplaced(keys: list[str], what: str) -> None:
    if keys:
        shown = ", ".join(sorted(keys)[:20]) + (" ..." if len(keys) > 20 else "")
        raise ConversionError(f"{len(keys)} key(s) cannot be placed in the {what} layout: {shown}")


def dense_to_timm(state_dict: StateDict, model_name: str) -> StateDict:
    """Our dense layout -> timm's ``convnextv2_*`` / ``convnext_*`` layout (MLP weights shaped as timm's variant
    expects). GRN-free weights of a V2 variant get identity GRNs (timm's V2 always has them); V1 has none."""
    spec = get_variant(model_name)
    conv_mlp = spec.timm_conv_mlp
    if spec.use_grn:
        state_dict = with_identity_grn(state_dict)
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
    """timm's ``convnextv2_*`` / ``convnext_*`` layout -> our dense layout (1x1 conv MLP weights flattened to Linear
    weights)."""
    out: StateDict = {}
    unplaced: list[str] = []
    for key, t in state_dict.items():
        if m := re.fullmatch(r"stem\.([01])\.(weight|bias)", key):
            new = f"downsample_layers.0.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"stages\.([123])\.downsample\.([01])\.(weight|bias)", key):
            new = f"downsample_layers.{m[1]}.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc1|mlp\.fc2|mlp\.grn\.weight|"
                               r"mlp\.grn\.bias|gamma)(\.weight|\.bias)?", key):
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


# --- Hugging Face transformers -----------------------------------------------------------------------------------

_HF_PREFIX = "convnextv2."  # ConvNextV2ForImageClassification's base model; its head is top-level ``classifier``
# (our dense pattern, transformers name, tensor transform: "" keep | "grn" (4C,) <-> (1, 1, 1, 4C))
_HF_RULES: list[tuple[str, str, str]] = [
    (r"downsample_layers\.0\.0\.(weight|bias)", r"embeddings.patch_embeddings.\1", ""),
    (r"downsample_layers\.0\.1\.(weight|bias)", r"embeddings.layernorm.\1", ""),
    (r"downsample_layers\.([123])\.([01])\.(weight|bias)", r"encoder.stages.\1.downsampling_layer.\2.\3", ""),
    (r"stages\.(\d+)\.(\d+)\.(dwconv|pwconv1|pwconv2)\.(weight|bias)", r"encoder.stages.\1.layers.\2.\3.\4", ""),
    (r"stages\.(\d+)\.(\d+)\.norm\.(weight|bias)", r"encoder.stages.\1.layers.\2.layernorm.\3", ""),
    (r"stages\.(\d+)\.(\d+)\.grn\.gamma", r"encoder.stages.\1.layers.\2.grn.weight", "grn"),
    (r"stages\.(\d+)\.(\d+)\.grn\.beta", r"encoder.stages.\1.layers.\2.grn.bias", "grn"),
    (r"norm\.(weight|bias)", r"layernorm.\1", ""),
]
# the same correspondence read the other way (transformers name without the ``convnextv2.`` prefix -> ours)
_HF_INVERSE: list[tuple[str, str, str]] = [
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"downsample_layers.0.0.\1", ""),
    (r"embeddings\.layernorm\.(weight|bias)", r"downsample_layers.0.1.\1", ""),
    (r"encoder\.stages\.([123])\.downsampling_layer\.([01])\.(weight|bias)", r"downsample_layers.\1.\2.\3", ""),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(dwconv|pwconv1|pwconv2)\.(weight|bias)", r"stages.\1.\2.\3.\4", ""),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.(weight|bias)", r"stages.\1.\2.norm.\3", ""),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.weight", r"stages.\1.\2.grn.gamma", "grn"),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.grn\.bias", r"stages.\1.\2.grn.beta", "grn"),
    (r"layernorm\.(weight|bias)", r"norm.\1", ""),
]


def dense_to_transformers(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our dense layout -> Hugging Face ``ConvNextV2Model`` names (``ConvNextV2ForImageClassification`` with a head).

    GRN ``(4C,)`` -> ``(1, 1, 1, 4C)``; with ``head.*`` present every trunk key gets the ``convnextv2.`` prefix and
    the head becomes ``classifier.*``.
    """
    state_dict = with_identity_grn(state_dict)
    with_head = any(k.startswith("head.") for k in state_dict)
    prefix = _HF_PREFIX if with_head else ""
    out: StateDict = {}
    unplaced: list[str] = []
    for key, t in state_dict.items():
        if m := re.fullmatch(r"head\.(weight|bias)", key):
            out[f"classifier.{m[1]}"] = t
            continue
        for pattern, repl, transform in _HF_RULES:
            if re.fullmatch(pattern, key):
                out[prefix + re.sub(pattern, repl, key)] = t.reshape(1, 1, 1, -1) if transform == "grn" else t
                break
        else:
            unplaced.append(key)
    _fail_unplaced(unplaced, "transformers")
    return out


def transformers_to_dense(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Hugging Face ``ConvNextV2Model`` / ``ConvNextV2ForImageClassification`` -> our dense layout."""
    out: StateDict = {}
    unplaced: list[str] = []
    for key, t in state_dict.items():
        name = key[len(_HF_PREFIX):] if key.startswith(_HF_PREFIX) else key
        if m := re.fullmatch(r"classifier\.(weight|bias)", name):
            out[f"head.{m[1]}"] = t
            continue
        for pattern, repl, transform in _HF_INVERSE:
            if m := re.fullmatch(pattern, name):
                out[m.expand(repl)] = t.reshape(-1) if transform == "grn" else t
                break
        else:
            unplaced.append(key)
    return _finish(out, unplaced, "dense")


# --- layout detection and densifying --------------------------------------------------------------------------

LAYOUTS = ("fcmae", "dense", "official_sparse", "official_dense", "official_fcmae", "timm", "transformers")
# DDP / torch.compile wrappers put these in front of every key
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ENCODER = "encoder."
# our dense keys, exactly (used to validate what the per-layout renames produce)
_DENSE_KEY_RE = re.compile(
    r"downsample_layers\.[0-3]\.[01]\.(weight|bias)"
    r"|stages\.\d+\.\d+\.(dwconv|norm|pwconv1|pwconv2)\.(weight|bias)"
    r"|stages\.\d+\.\d+\.grn\.(gamma|beta)"
    r"|stages\.\d+\.\d+\.gamma"
    r"|(norm|head)\.(weight|bias)"
)
_SPARSE_MARK_RE = re.compile(r"\.kernel$|\.ln\.|\.linear\.")
_TIMM_MARK_RE = re.compile(r"^stem\.|^stages\.\d+\.(blocks|downsample)\.")
_HF_MARK_RE = re.compile(
    r"^(convnextv2\.)?(embeddings\.patch_embeddings\.|encoder\.stages\.\d+\.(layers|downsampling_layer)\.)"
)
_GRN_GAMMA_RE = re.compile(r"stages\.\d+\.\d+\.grn\.gamma")
_LAYER_SCALE_RE = re.compile(r"stages\.\d+\.\d+\.gamma")
_STAGE_KEY_RE = re.compile(r"stages\.\d+\.\d+\.(dwconv|pwconv1)\.weight$")


def has_grn(dense_sd: Mapping[str, Tensor]) -> bool:
    """Whether dense weights have GRN parameters (False: a model built with ``use_grn=False``)."""
    return any(_GRN_GAMMA_RE.fullmatch(k) for k in dense_sd)


def has_layer_scale(dense_sd: Mapping[str, Tensor]) -> bool:
    """Whether dense weights have ConvNeXt V1's LayerScale (``stages.i.j.gamma``): a V1 variant's weights."""
    return any(_LAYER_SCALE_RE.fullmatch(k) for k in dense_sd)


def with_identity_grn(dense_sd: Mapping[str, Tensor]) -> StateDict:
    """GRN-free dense weights + zero GRN ``gamma``/``beta`` ``(4C,)`` in every block: a GRN with zero parameters is
    the identity, so the result computes the same function in a model with GRN (timm's and transformers' always
    have one). Weights with GRN are returned unchanged (as a new dict)."""
    out = dict(dense_sd)
    if has_grn(out):
        return out
    for key, t in dense_sd.items():
        if m := re.fullmatch(r"(stages\.\d+\.\d+\.)pwconv1\.bias", key):
            out[m[1] + "grn.gamma"] = torch.zeros_like(t)
            out[m[1] + "grn.beta"] = torch.zeros_like(t)
    return out


def is_decoder_key(key: str) -> bool:
    """FCMAE decoder parameters (ours and official alike): ``proj.*``, ``mask_token``, ``decoder.*``, ``pred.*``."""
    return key == "mask_token" or key.startswith(("proj.", "decoder.", "pred."))


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Remove ``module.`` / ``_orig_mod.`` when every key carries it (repeatedly, e.g. DDP around compile)."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _sample_keys(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} keys)" if len(keys) > n else "")


def _body(sd: StateDict) -> tuple[StateDict, bool]:
    """Encoder keys with ``encoder.`` stripped (decoder keys left out), and whether the prefix was used."""
    if any(k.startswith(_ENCODER) for k in sd):
        return {k[len(_ENCODER):]: v for k, v in sd.items() if k.startswith(_ENCODER)}, True
    return {k: v for k, v in sd.items() if not is_decoder_key(k)}, False


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """Name the layout of a state dict from its keys and shapes: one of ``LAYOUTS``.

    ``ConversionError`` listing a few keys when none fits. Dense-named layouts are told apart by the GRN
    parameters: ``(4C,)`` ours, ``(1, 4C)`` the released FCMAE weights, ``(1, 1, 1, 4C)`` the official dense code.
    """
    sd = strip_wrapper_prefixes(state_dict)
    keys = list(sd)
    if any(_HF_MARK_RE.search(k) for k in keys):
        return "transformers"
    body, prefixed = _body(sd)
    if any(_SPARSE_MARK_RE.search(k) for k in body):
        return "official_sparse"
    if not prefixed and any(_TIMM_MARK_RE.search(k) for k in body):
        return "timm"
    gammas = [body[k] for k in body if _GRN_GAMMA_RE.fullmatch(k)]
    has_trunk = any(k.startswith("downsample_layers.") for k in body)
    if not gammas and has_trunk and any(_STAGE_KEY_RE.match(k) for k in body):
        # blocks without GRN (model.use_grn=false): the dense-named layouts differ only in GRN shapes, so these
        # weights are ours whatever wrote them
        return "fcmae" if prefixed else "dense"
    if gammas and has_trunk:
        ndims = {g.ndim for g in gammas}
        if ndims == {1}:
            return "fcmae" if prefixed else "dense"
        if ndims == {2} and all(g.shape[0] == 1 for g in gammas):
            return "official_fcmae"
        if ndims == {4}:
            return "official_dense"
        shapes = sorted({tuple(g.shape) for g in gammas})[:4]
        raise ConversionError(f"GRN gamma shapes are mixed or unknown ({shapes}); expected (4C,), (1, 4C) or "
                              "(1, 1, 1, 4C) throughout")
    raise ConversionError(
        f"unrecognised checkpoint layout (expected one of {', '.join(LAYOUTS)}); keys: {_sample_keys(keys)}"
    )


def _finish(out: StateDict, unplaced: list[str], what: str) -> StateDict:
    bad = [k for k in out if not _DENSE_KEY_RE.fullmatch(k)]
    _fail_unplaced(unplaced + bad, what)
    return out


def _densify(
    state_dict: Mapping[str, Tensor], rename: Callable[[str, Tensor], tuple[str, Tensor] | None], what: str
) -> StateDict:
    """Shared walk: strip wrappers, drop decoder keys, keep ``encoder.*`` (when used), apply ``rename``."""
    sd = strip_wrapper_prefixes(state_dict)
    prefixed = any(k.startswith(_ENCODER) for k in sd)
    out: StateDict = {}
    unplaced: list[str] = []
    for key, t in sd.items():
        if is_decoder_key(key):
            continue
        if prefixed:
            if not key.startswith(_ENCODER):
                unplaced.append(key)
                continue
            key = key[len(_ENCODER):]
        placed = rename(key, t)
        if placed is None:
            unplaced.append(key)
        else:
            out[placed[0]] = placed[1]
    return _finish(out, unplaced, what)


def fcmae_to_dense(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our FCMAE checkpoint -> our dense layout: strip ``encoder.``, drop the decoder.

    The FCMAE encoder has no final ``norm``/``head``, so neither does the result (load it with ``strict=False``
    or into a model whose ``norm`` is then trained/reset).
    """
    return _densify(state_dict, lambda k, t: (k, t), "dense")


def official_dense_to_dense(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official dense ConvNeXt V2 -> our dense: GRN ``(1, 1, 1, 4C)`` or ``(1, 4C)`` -> ``(4C,)``.

    Covers ``official_dense`` (maybe under ``module.``/``encoder.``) and ``official_fcmae`` (the released FCMAE
    weights, whose decoder keys are dropped).
    """

    def rename(key: str, t: Tensor) -> tuple[str, Tensor]:
        if _GRN_GAMMA_RE.fullmatch(key) or key.endswith(".grn.beta"):
            t = t.reshape(-1)
        return key, t

    return _densify(state_dict, rename, "dense")


def sparse_kernel_to_dense(kernel: Tensor) -> Tensor:
    """MinkowskiEngine kernel -> PyTorch conv weight.

    ``(k*k, C_in, C_out)`` -> ``(C_out, C_in, k, k)``; depthwise ``(k*k, C)`` -> ``(C, 1, k, k)``. Minkowski orders
    kernel offsets with height and width swapped relative to PyTorch, hence the final transpose.
    """
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(1)  # depthwise: (k*k, 1, C), one input channel per group
    if kernel.ndim != 3:
        raise ConversionError(f"sparse kernel must be (k*k, C) or (k*k, C_in, C_out), got {tuple(kernel.shape)}")
    volume, c_in, c_out = kernel.shape
    k = math.isqrt(volume)
    if k * k != volume:
        raise ConversionError(f"sparse kernel volume {volume} is not a square (shape {tuple(kernel.shape)})")
    return kernel.permute(2, 1, 0).reshape(c_out, c_in, k, k).transpose(-1, -2).contiguous()


_SPARSE_RULES: list[tuple[re.Pattern[str], str, str]] = [
    # (pattern, replacement, tensor transform: "" keep | "kernel" | "flat")
    (re.compile(r"downsample_layers\.0\.([01])\.(weight|bias)"), r"downsample_layers.0.\1.\2", ""),
    (re.compile(r"downsample_layers\.([123])\.0\.ln\.(weight|bias)"), r"downsample_layers.\1.0.\2", ""),
    (re.compile(r"downsample_layers\.([123])\.1\.kernel"), r"downsample_layers.\1.1.weight", "kernel"),
    (re.compile(r"downsample_layers\.([123])\.1\.bias"), r"downsample_layers.\1.1.bias", "flat"),
    (re.compile(r"stages\.(\d+)\.(\d+)\.dwconv\.kernel"), r"stages.\1.\2.dwconv.weight", "kernel"),
    (re.compile(r"stages\.(\d+)\.(\d+)\.dwconv\.bias"), r"stages.\1.\2.dwconv.bias", "flat"),
    (re.compile(r"stages\.(\d+)\.(\d+)\.norm\.ln\.(weight|bias)"), r"stages.\1.\2.norm.\3", ""),
    (re.compile(r"stages\.(\d+)\.(\d+)\.(pwconv[12])\.linear\.(weight|bias)"), r"stages.\1.\2.\3.\4", ""),
    (re.compile(r"stages\.(\d+)\.(\d+)\.grn\.(gamma|beta)"), r"stages.\1.\2.grn.\3", "flat"),
]


def official_sparse_to_dense(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official FCMAE checkpoint (MinkowskiEngine encoder under ``encoder.``) -> our dense layout, decoder dropped."""

    def rename(key: str, t: Tensor) -> tuple[str, Tensor] | None:
        for pattern, repl, transform in _SPARSE_RULES:
            if pattern.fullmatch(key):
                if transform == "kernel":
                    t = sparse_kernel_to_dense(t)
                elif transform == "flat":
                    t = t.reshape(-1)
                return pattern.sub(repl, key), t
        return None

    return _densify(state_dict, rename, "dense")


def _dense_to_dense(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Already ours: validate the key names, drop wrapper prefixes and decoder keys."""
    return _densify(state_dict, lambda k, t: (k, t), "dense")


_TO_DENSE: dict[str, Callable[[Mapping[str, Tensor]], StateDict]] = {
    "fcmae": fcmae_to_dense,
    "dense": _dense_to_dense,
    "official_sparse": official_sparse_to_dense,
    "official_dense": official_dense_to_dense,
    "official_fcmae": official_dense_to_dense,
    "timm": lambda sd: timm_to_dense(strip_wrapper_prefixes(sd)),
    "transformers": lambda sd: transformers_to_dense(strip_wrapper_prefixes(sd)),
}


def to_dense(state_dict: Mapping[str, Tensor]) -> tuple[StateDict, str]:
    """Any supported layout -> ``(our dense state dict, name of the detected source layout)``."""
    layout = detect_layout(state_dict)
    return _TO_DENSE[layout](state_dict), layout


# --- variants and shape checks ---------------------------------------------------------------------------------

def infer_in_chans(dense_sd: Mapping[str, Tensor]) -> int:
    """Input channels from the stem conv weight ``(C0, in_chans, 4, 4)``."""
    stem = dense_sd.get(STEM_KEY)
    if stem is None or stem.ndim != 4:
        raise ConversionError(f"cannot infer in_chans: no stem conv weight '{STEM_KEY}' (4-D)")
    return int(stem.shape[1])


def infer_depths_dims(dense_sd: Mapping[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-stage block counts and widths of a dense state dict (widths from the stem/downsample convs)."""
    blocks: dict[int, set[int]] = {}
    for key in dense_sd:
        if m := re.match(r"stages\.(\d+)\.(\d+)\.", key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if sorted(blocks) != [0, 1, 2, 3]:
        raise ConversionError(f"expected blocks in stages 0-3, found stages {sorted(blocks)}")
    for i, js in blocks.items():
        if js != set(range(len(js))):
            raise ConversionError(f"stage {i} has non-contiguous block indices {sorted(js)}")
    depths = tuple(len(blocks[i]) for i in range(4))
    dims: list[int] = []
    for i in range(4):
        conv = dense_sd.get(f"downsample_layers.{i}.{0 if i == 0 else 1}.weight")
        if conv is None:  # fall back on the first block's depthwise conv
            conv = dense_sd.get(f"stages.{i}.0.dwconv.weight")
        if conv is None:
            raise ConversionError(f"cannot infer the width of stage {i}: no downsample or dwconv weight")
        dims.append(int(conv.shape[0]))
    return depths, tuple(dims)


def infer_variant(dense_sd: Mapping[str, Tensor]) -> str:
    """The registered variant whose depths and dims match the weights: ``convnext_*`` (V1) when they have LayerScale,
    else ``convnextv2_*``."""
    depths, dims = infer_depths_dims(dense_sd)
    layer_scale = has_layer_scale(dense_sd)
    if (name := variant_of(depths, dims, layer_scale)) is not None:
        return name
    known = "; ".join(f"{n} {get_variant(n).depths}/{get_variant(n).dims}" for n in list_models()
                      if (get_variant(n).ls_init_value is not None) == layer_scale)
    family = "ConvNeXt V1 (LayerScale)" if layer_scale else "ConvNeXt V2"
    raise ConversionError(f"no registered variant has depths {depths} and dims {dims} among the {family} ones "
                          f"(known: {known})")


def expected_dense_shapes(model_name: str, num_classes: int = 0, in_chans: int = 3, use_grn: bool = True
                          ) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``create_model(model_name, num_classes, in_chans, use_grn=...).state_dict()``, without
    building it.

    Computed from the registry so that checking a huge checkpoint costs nothing (building convnextv2_huge takes
    seconds and gigabytes); a test pins this against the real model.
    """
    spec = get_variant(model_name)
    d = spec.dims
    shapes: dict[str, tuple[int, ...]] = {
        STEM_KEY: (d[0], in_chans, 4, 4),
        "downsample_layers.0.0.bias": (d[0],),
        "downsample_layers.0.1.weight": (d[0],),
        "downsample_layers.0.1.bias": (d[0],),
    }
    for i in range(1, 4):
        shapes[f"downsample_layers.{i}.0.weight"] = (d[i - 1],)
        shapes[f"downsample_layers.{i}.0.bias"] = (d[i - 1],)
        shapes[f"downsample_layers.{i}.1.weight"] = (d[i], d[i - 1], 2, 2)
        shapes[f"downsample_layers.{i}.1.bias"] = (d[i],)
    for i, (depth, c) in enumerate(zip(spec.depths, d)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            shapes.update({
                p + "dwconv.weight": (c, 1, 7, 7), p + "dwconv.bias": (c,),
                p + "norm.weight": (c,), p + "norm.bias": (c,),
                p + "pwconv1.weight": (4 * c, c), p + "pwconv1.bias": (4 * c,),
                p + "pwconv2.weight": (c, 4 * c), p + "pwconv2.bias": (c,),
            })
            if use_grn:
                shapes.update({p + "grn.gamma": (4 * c,), p + "grn.beta": (4 * c,)})
            if spec.ls_init_value is not None:
                shapes[p + "gamma"] = (c,)
    shapes["norm.weight"] = (d[-1],)
    shapes["norm.bias"] = (d[-1],)
    if num_classes > 0:
        shapes["head.weight"] = (num_classes, d[-1])
        shapes["head.bias"] = (num_classes,)
    return shapes


def check_against_model(dense_sd: Mapping[str, Tensor], model_name: str) -> str:
    """Verify every key and shape against ``create_model(model_name, num_classes=<from head or 0>)``.

    ``in_chans`` follows the stem weight; the final ``norm`` may be absent (encoder-only exports). Returns the
    canonical model name; raises ``ConversionError`` naming keys with expected and found shapes. Weights without any
    GRN parameter are checked against the GRN-free model (``use_grn=False``).
    """
    try:
        name = canonical_name(model_name)
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    head = dense_sd.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    in_chans = infer_in_chans(dense_sd) if STEM_KEY in dense_sd else 3
    expected = expected_dense_shapes(name, num_classes, in_chans, use_grn=has_grn(dense_sd))
    problems: list[str] = []
    for key, t in dense_sd.items():
        if key not in expected:
            problems.append(f"{key} unexpected (found {tuple(t.shape)})")
        elif tuple(t.shape) != expected[key]:
            problems.append(f"{key} expected {expected[key]}, found {tuple(t.shape)}")
    optional = {"norm.weight", "norm.bias"}
    problems += [f"{key} missing (expected {shape})" for key, shape in expected.items()
                 if key not in dense_sd and key not in optional]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise ConversionError(f"weights do not fit {name}: {shown}")
    return name
