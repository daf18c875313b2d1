"""Models: dense ConvNeXt V2, the sparse encoder, and FCMAE."""

from fcmae.models.convnextv2 import ConvNeXtV2, create_model, list_models

__all__ = ["ConvNeXtV2", "create_model", "list_models"]
