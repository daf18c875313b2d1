"""Evaluation: top-1/top-5 of a classifier (``accuracy``), frozen-feature k-NN and linear probes (``features``), the
feature-collapse analysis (``collapse``) and reconstruction figures (``figures``).

Layer: above ``fcmae.models`` and ``fcmae.data``; nothing of the training side.
"""
