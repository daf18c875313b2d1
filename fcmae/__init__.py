"""fcmae: FCMAE self-supervised pretraining for ConvNeXt V2 with an exact, truly sparse encoder."""

from fcmae.masking import random_masking
from fcmae.models.convnextv2 import ConvNeXtV2, create_model, list_models
from fcmae.models.fcmae import FCMAE, create_fcmae

__version__ = "0.1.0"

__all__ = ["FCMAE", "ConvNeXtV2", "create_fcmae", "create_model", "list_models", "random_masking", "__version__"]
