"""The one weight loader: any checkpoint layout ``fcmae convert`` reads, into a dense ConvNeXt V2 or an FCMAE model.

Used by ``fcmae finetune --init``, ``fcmae evaluate``, ``fcmae visualize``, ``fcmae probe`` and
``fcmae.create_model(name, pretrained=path)``. Files are read by :func:`fcmae.weights.files.load_state_dict_file`
(safetensors, or ``torch.load(weights_only=True)``), so no file can run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fcmae.models.registry import STEM_KEY


class WeightsError(ValueError):
    """Weights that do not fit the model; the message names the file and the tensors."""


RUN_WEIGHT_FILES = ("best.safetensors", "last.safetensors", "encoder.safetensors")


def resolve_weights_path(path: str | Path, run_files: tuple[str, ...] = RUN_WEIGHT_FILES) -> Path:
    """The one resolver of what a user names as weights: a weight file or checkpoint folder as given; in a run folder
    the first of ``run_files`` present (default: best, last, encoder), else its newest complete checkpoint. A run
    folder with none of these is a ``WeightsError``. Folders are read by ``fcmae.weights.files`` (their model file)."""
    from fcmae.weights.checkpoints import find_latest_checkpoint
    from fcmae.weights.files import ACCELERATE_MODEL_FILES

    p = Path(path)
    if not p.is_dir() or any((p / name).is_file() for name in ACCELERATE_MODEL_FILES):
        return p
    for name in run_files:
        if (p / name).is_file():
            return p / name
    latest = find_latest_checkpoint(p / "checkpoints")
    if latest is not None:
        return latest
    if (p / "checkpoints").is_dir() or not run_files:
        raise WeightsError(f"{p}: no {', '.join(run_files) + ' and no ' if run_files else ''}complete "
                           "checkpoints/step_N inside")
    return p


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


def read_dense(path: str | Path, ema: bool = False) -> tuple[dict[str, Tensor], str, dict[str, str], Path]:
    """Any layout -> ``(our dense state dict, layout name, file metadata, resolved path)``; ``ema`` takes the EMA
    weights of a checkpoint that holds both (``model_ema``)."""
    from fcmae.weights.files import load_state_dict_file
    from fcmae.weights.layouts import to_dense

    src = resolve_weights_path(path)
    raw, meta = load_state_dict_file(src, ema=ema)
    dense, layout = to_dense(fold_probe_head(raw))
    return dense, layout, meta, src


def _adapt_stem(dense: dict[str, Tensor], in_chans: int) -> bool:
    """Stem weights for another number of input channels -> ``in_chans`` (timm's ``adapt_input_conv``)."""
    from timm.models import adapt_input_conv

    stem = dense.get(STEM_KEY)
    if stem is None or stem.ndim != 4 or stem.shape[1] == in_chans:
        return False
    dense[STEM_KEY] = adapt_input_conv(in_chans, stem, base_chans=stem.shape[1]).contiguous()
    return True


def _head_mismatch(model: nn.Module, dense: Mapping[str, Tensor]) -> bool:
    target = model.state_dict()
    return isinstance(model.head, nn.Linear) and any(
        k not in dense or dense[k].shape != target[k].shape for k in ("head.weight", "head.bias"))


def load_weights(model: nn.Module, path: str | Path, ema: bool = False) -> dict[str, Any]:
    """Load weights in any layout into a dense ``ConvNeXtV2`` (in place).

    - A head that is absent or of another shape is re-initialised (``model.reset_classifier``: trunc normal std
      2e-5, zero bias); a head of the right shape is kept.
    - An FCMAE encoder has no final ``norm``: the model's fresh LayerNorm (weight 1, bias 0) is kept then.
    - Stem weights for another number of input channels are adapted (timm's ``adapt_input_conv``).
    - Any other missing, extra or mis-shaped tensor is a ``WeightsError`` naming it (e.g. another variant's).
    - ``ema``: the EMA weights of a checkpoint that holds both (an error when it has none).

    Returns ``{"path", "layout", "variant_in_file", "fresh": [keys initialised fresh], "head_reset": bool,
    "adapted_stem": bool, "metadata": {...}}``.
    """
    return _fit(model, *read_dense(path, ema))


def _fit(model: nn.Module, dense: dict[str, Tensor], layout: str, meta: dict[str, str], src: Path) -> dict[str, Any]:
    """``load_weights`` on weights already read and converted to our dense layout."""
    from fcmae.weights.layouts import infer_variant

    try:
        variant = infer_variant(dense)
    except ValueError:
        variant = "unknown"
    adapted = _adapt_stem(dense, model.in_chans)
    head_reset = _head_mismatch(model, dense)
    if head_reset or not isinstance(model.head, nn.Linear):
        dense.pop("head.weight", None)
        dense.pop("head.bias", None)
    target = model.state_dict()
    unexpected = [k for k in dense if k not in target]
    mismatched = [f"{k} {tuple(dense[k].shape)} vs {tuple(target[k].shape)}" for k in dense
                  if k in target and dense[k].shape != target[k].shape]
    missing = [k for k in target if k not in dense and not k.startswith(("norm.", "head."))]
    if missing and not unexpected and not mismatched and all(".grn." in k for k in missing):
        raise WeightsError(f"{src}: these weights have no GRN (a model trained with model.use_grn=false) but the model "
                           "has GRN layers; build it with use_grn=False (config: model.use_grn=false)")
    if unexpected and not missing and not mismatched and all(".grn." in k for k in unexpected):
        raise WeightsError(f"{src}: these weights have GRN layers but the model has none (model.use_grn=false); "
                           "build it with use_grn=True")
    if unexpected or mismatched or missing:
        shown = "; ".join([*(f"unexpected {k}" for k in unexpected[:3]), *mismatched[:3],
                           *(f"missing {k}" for k in missing[:3])])
        raise WeightsError(f"{src}: weights of {variant} ({layout} layout) do not fit the model "
                           f"(depths {model.depths}, dims {model.dims}): {shown}")
    model.load_state_dict(dense, strict=False)
    if head_reset:
        model.reset_classifier(model.num_classes)
    return {"path": str(src), "layout": layout, "variant_in_file": variant, "head_reset": head_reset,
            "fresh": [k for k in target if k not in dense], "adapted_stem": adapted, "metadata": meta}


def load_classifier(path: str | Path, name: str | None = None, in_chans: int | None = None, ema: bool = False
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """A dense classifier built from what a weight file holds: variant (from the shapes, or ``name``), number of
    classes (from the head), input channels (the stem's, or ``in_chans`` with the stem adapted).

    Returns ``(model in eval mode, info)`` with ``load_weights``'s info plus ``name``, ``num_classes``,
    ``weight_in_chans``; a file without a classifier head is a ``WeightsError``.
    """
    from fcmae.weights.layouts import check_against_model, has_grn, infer_in_chans, infer_variant
    dense, layout, meta, src = read_dense(path, ema)
    if "head.weight" not in dense:
        raise WeightsError(f"{src}: no classifier head in these weights ({layout} layout, encoder only?); "
                           "fine-tune them first (fcmae finetune --init ...)")
    name = check_against_model(dense, name) if name else infer_variant(dense)
    weight_chans = infer_in_chans(dense)
    model = create_model(name, num_classes=int(dense["head.weight"].shape[0]), in_chans=in_chans or weight_chans,
                         use_grn=has_grn(dense))
    info = _fit(model, dense, layout, meta, src)
    info.update(name=name, num_classes=model.num_classes, weight_in_chans=weight_chans)
    return model.eval(), info


def load_encoder(path: str | Path, in_chans: int | None = None, ema: bool = False
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """A dense ConvNeXt V2 trunk without classifier (``num_classes=0``) from weights in any layout: variant and GRN
    from the weights, ``in_chans`` the stem's unless given (then the stem is adapted). Any head in the file is left
    out; a missing final norm stays the identity. Returns ``(model in eval mode, info)`` as ``load_classifier``."""
    from fcmae.weights.layouts import has_grn, infer_in_chans, infer_variant
    dense, layout, meta, src = read_dense(path, ema)
    dense.pop("head.weight", None)
    dense.pop("head.bias", None)
    name = infer_variant(dense)
    weight_chans = infer_in_chans(dense)
    model = create_model(name, num_classes=0, in_chans=in_chans or weight_chans, use_grn=has_grn(dense))
    info = _fit(model, dense, layout, meta, src)
    info.update(name=name, num_classes=0, weight_in_chans=weight_chans, use_grn=model.use_grn)
    return model.eval(), info


def create_model(name: str, *, pretrained: str | Path | None = None, pretrained_ema: bool = False, **kwargs: Any
                 ) -> nn.Module:
    """Build a dense ConvNeXt V2 variant by name (``convnextv2_atto`` ... ``convnextv2_huge``, ``convnextv2_test``)
    and load ``pretrained`` weights in any layout ``fcmae convert`` reads (a missing or mis-shaped head is
    re-initialised, the stem adapted to ``in_chans``). ``kwargs``: ``fcmae.models.build_convnextv2``'s (num_classes,
    in_chans, drop_path_rate, head_init_scale, use_grn). The public one-call API, ``fcmae.create_model``."""
    from fcmae.models.convnextv2 import build_convnextv2

    model = build_convnextv2(name, **kwargs)
    if pretrained:
        load_weights(model, pretrained, ema=pretrained_ema)
    return model
