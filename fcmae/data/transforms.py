"""Normalisation statistics and the pretraining, fine-tuning and evaluation transforms."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from fcmae.data.images import check_in_chans
from fcmae.models.registry import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from fcmae.models.registry import mean_std as default_mean_std

__all__ = ["GRAY_MEAN", "GRAY_STD", "IMAGENET_MEAN", "IMAGENET_STD", "build_eval_transform", "build_finetune_transform",
           "build_pretrain_transform", "mean_std"]



def mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics for ``in_chans`` (1 or 3) channels: the models' defaults (``fcmae.models.registry``)."""
    return default_mean_std(check_in_chans(in_chans))


# --------------------------------------------------------------------------------------------- transforms
class _ToRGB:
    """PIL image -> RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


class _FirstChannels:
    """Tensor ``(C, H, W)`` -> ``(k, H, W)``."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, x: Tensor) -> Tensor:
        return x[: self.k]


def build_pretrain_transform(input_size: int = 224, crop_scale: tuple[float, float] = (0.2, 1.0),
                             hflip: float = 0.5, in_chans: int = 3) -> T.Compose:
    """FCMAE pretraining augmentation: random resized crop (bicubic), flip, normalise -> ``(C, S, S)`` float."""
    mean, std = mean_std(in_chans)
    ops: list[Any] = [T.RandomResizedCrop(input_size, scale=tuple(crop_scale),
                                          interpolation=T.InterpolationMode.BICUBIC)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def build_eval_transform(input_size: int = 224, crop_pct: float = 224 / 256, in_chans: int = 3) -> T.Compose:
    """Resize the shorter side to ``input_size / crop_pct`` (bicubic), center crop, normalise -> ``(C, S, S)``."""
    mean, std = mean_std(in_chans)
    resize = int(math.floor(input_size / crop_pct + 1e-6))  # 224 / 0.875 -> 256, not 255 from rounding error
    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def build_finetune_transform(input_size: int = 224, in_chans: int = 3,
                             auto_augment: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                             remode: str = "pixel", recount: int = 1,
                             color_jitter: float | None = 0.4, scale: tuple[float, float] = (0.08, 1.0),
                             hflip: float = 0.5, interpolation: str = "bicubic") -> Callable[[Image.Image], Tensor]:
    """timm's training augmentation (RandAugment, random erasing ...) -> ``(C, S, S)`` float.

    timm's RandAugment works on RGB images, so for ``in_chans=1`` the gray image is replicated to RGB, augmented
    with the gray statistics on all three channels and cut back to its first channel; every op but random
    erasing keeps the three channels equal, and erasing's per-channel noise cut to one channel is what it would
    draw for one channel.
    """
    from timm.data import create_transform

    mean, std = mean_std(in_chans)
    tf = create_transform(input_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                          auto_augment=auto_augment or None, interpolation=interpolation, mean=mean * (3 // len(mean)),
                          std=std * (3 // len(std)), re_prob=reprob, re_mode=remode, re_count=recount)
    if in_chans == 3:
        return T.Compose([_ToRGB(), tf])
    return T.Compose([_ToRGB(), tf, _FirstChannels(1)])


