"""fcmae: FCMAE self-supervised pretraining for ConvNeXt V2 with an exact, truly sparse encoder.

The public one-call API is resolved lazily (module ``__getattr__``), so ``import fcmae`` and the ``fcmae`` command's
``--help`` do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "create_model": "fcmae.weights.loader",  # dense ConvNeXt V2, optionally with pretrained weights in any layout
    "load_weights": "fcmae.weights.loader",
    "ConvNeXtV2": "fcmae.models.convnextv2",
    "FCMAE": "fcmae.models.fcmae",
    "create_fcmae": "fcmae.models.fcmae",
    "list_models": "fcmae.models.registry",
    "random_masking": "fcmae.models.masking",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fcmae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
