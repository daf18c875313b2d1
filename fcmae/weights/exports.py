"""Model folders other libraries load directly: timm ``local-dir:`` and Hugging Face ``from_pretrained``.

Both get ``config.json`` + ``model.safetensors``, written atomically (``fcmae.weights.files.save_folder``):

- timm: ``timm.create_model("local-dir:OUT", pretrained=True)`` builds the architecture named in ``config.json``
  (``model_args`` carry the depths/dims of variants timm does not register, and ``in_chans`` other than 3) and
  loads the weights strictly.
- transformers: ``ConvNextV2Model.from_pretrained(OUT)`` (``ConvNextV2ForImageClassification`` when the weights
  have a head) loads every weight, none missing or unexpected. The final LayerNorm's ``layer_norm_eps`` is set to
  1e-6, ours (transformers defaults to 1e-12).

An FCMAE encoder has no final norm: both get the identity LayerNorm (weight 1, bias 0), which is exactly what a
fresh model starts fine-tuning with. A head is written only when the source has one (``num_classes: 0`` else).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fcmae.models.registry import CROP_PCT, get_variant, pretrained_cfg
from fcmae.weights.files import save_folder, save_state_dict
from fcmae.weights.layouts import ConversionError, dense_to_timm, dense_to_transformers, infer_in_chans

StateDict = dict[str, Tensor]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INTEROP_HINT = "pip install 'fcmae[interop]'"


def with_identity_norm(dense: Mapping[str, Tensor]) -> tuple[StateDict, bool]:
    """Add the final LayerNorm as identity (weight 1, bias 0, shape ``(C_last,)``) when absent.

    Returns ``(state dict, whether it was added)``; the width comes from the last stage's downsample conv.
    """
    out = dict(dense)
    if "norm.weight" in out and "norm.bias" in out:
        return out, False
    ref = out.get("downsample_layers.3.1.weight")
    if ref is None:
        raise ConversionError("cannot size the final norm: no 'downsample_layers.3.1.weight'")
    c = int(ref.shape[0])
    out["norm.weight"] = torch.ones(c, dtype=ref.dtype)
    out["norm.bias"] = torch.zeros(c, dtype=ref.dtype)
    return out, True


def _num_classes(dense: Mapping[str, Tensor]) -> int:
    head = dense.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def timm_config(variant: str, dense: Mapping[str, Tensor], image_size: int = 224, crop_pct: float = CROP_PCT
                ) -> dict[str, Any]:
    """``config.json`` for ``timm.create_model("local-dir:...")`` (what timm's ``save_config_for_hf`` writes).

    ``architecture`` is the timm name of ``variant``; variants timm lacks (``convnextv2_test``, ``convnext_test``) are
    built as the atto of their family (same 1x1-conv MLP, same block) with their own ``depths``/``dims`` in
    ``model_args``.
    """
    spec = get_variant(variant)
    num_classes, in_chans = _num_classes(dense), infer_in_chans(dense)
    model_args: dict[str, Any] = {}
    arch = variant
    if not spec.in_timm:
        arch = "convnext_atto" if spec.family == "v1" else "convnextv2_atto"
        model_args.update(depths=list(spec.depths), dims=list(spec.dims))
    if in_chans != 3:
        model_args["in_chans"] = in_chans
    # the model's own record (ConvNeXtV2.pretrained_cfg) in timm's names, JSON lists for tuples
    cfg = pretrained_cfg(in_chans, num_classes, image_size, crop_pct, layout="timm")
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    config = {"architecture": arch, "num_classes": num_classes, "num_features": spec.dims[-1],
              "global_pool": "avg", "pretrained_cfg": cfg}
    if model_args:
        config["model_args"] = model_args
    return config


def transformers_config_json(variant: str, dense: Mapping[str, Tensor], image_size: int = 224) -> str:
    """``config.json`` text for ``ConvNextV2Model`` / ``ConvNextV2ForImageClassification`` (needs transformers)."""
    if get_variant(variant).family == "v1":
        raise ConversionError(f"--to transformers writes ConvNeXt V2 models (ConvNextV2Model); {variant} is a "
                              "ConvNeXt V1 (LayerScale blocks): export it with --to timm")
    try:
        from transformers import ConvNextV2Config
    except ImportError as exc:
        raise ConversionError(f"--to transformers needs the transformers package: {INTEROP_HINT}") from exc
    spec = get_variant(variant)
    num_classes = _num_classes(dense)
    labels: dict[str, Any] = {}
    if num_classes:
        labels = {"id2label": {i: f"LABEL_{i}" for i in range(num_classes)},
                  "label2id": {f"LABEL_{i}": i for i in range(num_classes)}}
    config = ConvNextV2Config(
        num_channels=infer_in_chans(dense), patch_size=4, num_stages=4, hidden_sizes=list(spec.dims),
        depths=list(spec.depths), hidden_act="gelu", layer_norm_eps=1e-6, drop_path_rate=0.0, image_size=image_size,
        architectures=["ConvNextV2ForImageClassification" if num_classes else "ConvNextV2Model"], **labels,
    )
    return config.to_json_string(use_diff=False)


def _write(files_sd: StateDict, metadata: Mapping[str, str], config_text: str) -> Callable[[Path], None]:
    """The function that fills a (temp) folder with ``model.safetensors`` and ``config.json``."""

    def write(folder: Path) -> None:
        save_state_dict(folder / WEIGHTS_NAME, files_sd, metadata)
        (folder / CONFIG_NAME).write_text(config_text, encoding="utf-8")
    return write


def export_timm_folder(path: str | os.PathLike[str], dense: Mapping[str, Tensor], variant: str,
                       metadata: Mapping[str, str] | None = None, image_size: int = 224) -> StateDict:
    """Write a timm ``local-dir`` folder from our dense weights (identity final norm if absent).

    Returns the timm state dict written (keys as ``timm.create_model(...).state_dict()``).
    """
    full, _ = with_identity_norm(dense)
    sd = dense_to_timm(full, variant)
    config = timm_config(variant, full, image_size)
    save_folder(path, _write(sd, {**(metadata or {}), "format": "pt"}, json.dumps(config, indent=2) + "\n"))
    return sd


def export_transformers_folder(path: str | os.PathLike[str], dense: Mapping[str, Tensor], variant: str,
                               metadata: Mapping[str, str] | None = None, image_size: int = 224) -> StateDict:
    """Write a Hugging Face ``from_pretrained`` folder from our dense weights (identity final norm if absent).

    The safetensors metadata carries ``format: pt``, which transformers requires. Returns the state dict written.
    """
    full, _ = with_identity_norm(dense)
    config_text = transformers_config_json(variant, full, image_size)
    sd = dense_to_transformers(full)
    save_folder(path, _write(sd, {**(metadata or {}), "format": "pt"}, config_text))
    return sd
