"""fcmae: FCMAE self-supervised pretraining for ConvNeXt V2 with a truly sparse encoder."""

from fcmae.models.convnextv2 import ConvNeXtV2, create_model, list_models

__version__ = "0.1.0"

__all__ = ["ConvNeXtV2", "create_model", "list_models", "__version__"]
