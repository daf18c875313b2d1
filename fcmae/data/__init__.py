"""All data code: image files, Fashion-MNIST and the demo set, transforms, seeded sampling, dataset builders.

- :mod:`fcmae.data.images`: decoding any image to gray/RGB, folder scanning, ``ImageFiles``, ``LabeledImageFolder``
- :mod:`fcmae.data.fashion_mnist`: IDX files, ``FashionMNIST``, the embedded ``DemoImages``
- :mod:`fcmae.data.transforms`: mean/std and the pretraining, fine-tuning and evaluation transforms
- :mod:`fcmae.data.sampling`: ``EpochSampler`` and ``SeededSamples`` (per-sample seeds, optional masks)
- :mod:`fcmae.data.builders`: ``build_pretrain_dataset``, ``build_finetune_data``, label budgets, dataset specs
- :mod:`fcmae.data.sources`: the table of data sources (``data.source``) and the modules that build them;
  :mod:`fcmae.data.protocol`: what they implement; :mod:`fcmae.data.policy`: what happens to bad data

The names below are resolved lazily (module ``__getattr__``): ``fcmae.data.sources`` is pure Python, and importing
it (as ``fcmae.config`` does) must not import torch.
"""

import importlib
from typing import Any

# public name -> the submodule that defines it
_API = {
    "BadImageError": "images", "DATASET_DEFAULT_FASHION_MNIST": "fashion_mnist", "DataError": "images",
    "DemoImages": "fashion_mnist", "DropLabels": "fashion_mnist", "EpochSampler": "sampling",
    "FASHION_MNIST_CLASSES": "fashion_mnist", "FashionMNIST": "fashion_mnist", "FinetuneData": "protocol",
    "GRAY_MEAN": "transforms", "GRAY_STD": "transforms", "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms",
    "IMAGE_EXTENSIONS": "images", "ImageFiles": "images", "LabeledImageFolder": "images", "Sample": "sampling",
    "SeededSamples": "sampling", "budget_counts": "builders", "build_eval_transform": "transforms",
    "build_finetune_data": "builders", "build_finetune_transform": "transforms", "build_pretrain_dataset": "builders",
    "build_pretrain_train_set": "builders", "build_pretrain_transform": "transforms", "check_in_chans": "images",
    "dataset_targets": "builders", "demo_asset_path": "fashion_mnist", "find_images": "images",
    "first_per_class": "builders", "labelled_dataset": "builders", "load_fashion_mnist_arrays": "fashion_mnist",
    "load_image": "images", "make_demo_asset": "fashion_mnist", "mean_std": "transforms", "read_idx": "fashion_mnist",
    "sample_seed": "sampling", "stratified_subset": "builders", "to_model_mode": "images",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"fcmae.data.{_API[name]}"), name)
    raise AttributeError(f"module 'fcmae.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
