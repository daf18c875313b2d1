"""All data code: image files, Fashion-MNIST and the demo set, transforms, seeded sampling, dataset builders.

- :mod:`fcmae.data.images`: decoding any image to gray/RGB, folder scanning, ``ImageFiles``, ``LabeledImageFolder``
- :mod:`fcmae.data.fashion_mnist`: IDX files, ``FashionMNIST``, the embedded ``DemoImages``
- :mod:`fcmae.data.transforms`: mean/std and the pretraining, fine-tuning and evaluation transforms
- :mod:`fcmae.data.sampling`: ``EpochSampler`` and ``SeededSamples`` (per-sample seeds, optional masks)
- :mod:`fcmae.data.builders`: ``build_pretrain_dataset``, ``build_finetune_data``, label budgets, dataset specs
"""

from fcmae.data.builders import (
    FinetuneData,
    budget_counts,
    build_finetune_data,
    build_pretrain_dataset,
    build_pretrain_train_set,
    dataset_targets,
    first_per_class,
    labelled_dataset,
    stratified_subset,
)
from fcmae.data.fashion_mnist import (
    DATASET_DEFAULT_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    DemoImages,
    DropLabels,
    FashionMNIST,
    demo_asset_path,
    load_fashion_mnist_arrays,
    make_demo_asset,
    read_idx,
)
from fcmae.data.images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    DataError,
    ImageFiles,
    LabeledImageFolder,
    check_in_chans,
    find_images,
    load_image,
    to_model_mode,
)
from fcmae.data.sampling import EpochSampler, Sample, SeededSamples, sample_seed
from fcmae.data.transforms import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_finetune_transform,
    build_pretrain_transform,
    mean_std,
)

__all__ = [
    "DATASET_DEFAULT_FASHION_MNIST", "FASHION_MNIST_CLASSES", "GRAY_MEAN", "GRAY_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "IMAGE_EXTENSIONS", "BadImageError", "DataError", "DemoImages", "DropLabels", "EpochSampler", "FashionMNIST",
    "FinetuneData", "ImageFiles", "LabeledImageFolder", "SeededSamples", "budget_counts", "build_eval_transform",
    "build_finetune_data", "build_finetune_transform", "build_pretrain_dataset",
    "build_pretrain_train_set", "build_pretrain_transform",
    "check_in_chans", "dataset_targets", "demo_asset_path", "find_images", "first_per_class", "labelled_dataset",
    "load_fashion_mnist_arrays", "load_image", "make_demo_asset", "mean_std", "read_idx", "Sample", "sample_seed",
    "stratified_subset", "to_model_mode",
]
