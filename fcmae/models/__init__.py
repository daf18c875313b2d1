"""Models: the variant registry, dense ConvNeXt V2, the sparse encoders, the masked-dense reference, FCMAE.

Imports nothing of ours outside this package; weights are loaded one layer up (``fcmae.weights``). The names below
are resolved lazily (module ``__getattr__``): ``fcmae.models.registry`` is pure Python, and importing it (as
``fcmae.config`` does) must not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_API = {
    "ConvNeXtV2": "convnextv2", "ConvNeXtV2Trunk": "convnextv2", "build_convnextv2": "convnextv2",
    "build_trunk": "convnextv2", "FCMAE": "fcmae", "create_fcmae": "fcmae", "MASK_RATIO": "registry",
    "random_masking": "masking", "Variant": "registry", "canonical_name": "registry", "get_variant": "registry",
    "list_models": "registry",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"fcmae.models.{_API[name]}"), name)
    raise AttributeError(f"module 'fcmae.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
