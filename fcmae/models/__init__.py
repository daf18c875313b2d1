"""Models: the variant registry, dense ConvNeXt V2, the sparse encoders, the masked-dense reference, FCMAE.

Imports nothing of ours outside this package; weights are loaded one layer up (``fcmae.weights``).
"""

from fcmae.models.convnextv2 import ConvNeXtV2, ConvNeXtV2Trunk, build_convnextv2, build_trunk
from fcmae.models.fcmae import FCMAE, create_fcmae
from fcmae.models.masking import MASK_RATIO, random_masking
from fcmae.models.registry import Variant, canonical_name, get_variant, list_models

__all__ = ["FCMAE", "MASK_RATIO", "ConvNeXtV2", "ConvNeXtV2Trunk", "Variant", "build_convnextv2", "build_trunk",
           "canonical_name", "create_fcmae", "get_variant", "list_models", "random_masking"]
