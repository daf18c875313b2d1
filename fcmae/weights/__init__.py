"""Weight files: safe reading and atomic writing (``files``), training-checkpoint folders (``checkpoints``), layout
conversion between ours, the official code's, timm's and Hugging Face's (``layouts``), the one loader
(``loader``, with ``fcmae.create_model``) and the timm / transformers folder exports (``exports``).

Layer: above ``fcmae.models``; imports nothing of the training side, the configs or the commands.
"""
