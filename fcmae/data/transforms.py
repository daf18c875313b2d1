"""Normalisation statistics and the pretraining, fine-tuning and evaluation transforms."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from fcmae.data.decode import JpegBatch, JpegFile, JpegItem, decode_bytes, decode_jpeg_batch, pil_to_u8
from fcmae.data.images import check_in_chans
from fcmae.data.sampling import sample_generator
from fcmae.models.registry import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from fcmae.models.registry import mean_std as default_mean_std

logger = logging.getLogger(__name__)

__all__ = ["GRAY_MEAN", "GRAY_STD", "IMAGENET_MEAN", "IMAGENET_STD", "DeferredCropU8", "DeviceDecoder",
           "DecodeCrop", "DeviceNormalize", "DeviceRandomErasing", "RandomResizedCropU8", "ResizeCenterCropU8",
           "build_eval_transform", "build_finetune_transform", "build_pretrain_transform", "crop_params",
           "eval_resize", "mean_std", "resized_crop_u8"]



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


def crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random resized crop's ``(top, left, h, w)`` (the Inception / torchvision ``RandomResizedCrop`` rule: up to
    10 draws of area fraction in ``scale`` and log-uniform aspect in ``ratio``, else a central crop of the nearest
    allowed aspect), drawn from ``rng``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_u8(x: Tensor, box: tuple[int, int, int, int, int], size: int) -> Tensor:
    """``x[..., top:top+h, left:left+w]`` resized to ``size x size`` (bicubic, antialiased; uint8 kernels) and
    flipped left-right when ``box[4]``: box ``(top, left, h, w, flip)``. The one crop op of the CPU path and of
    the device decoder, so both give the same pixels."""
    top, left, h, w, flip = box
    out = TF.resized_crop(x, top, left, h, w, [size, size], interpolation=TF.InterpolationMode.BICUBIC,
                          antialias=True)
    return out.flip(-1) if flip else out


class RandomResizedCropU8:
    """FCMAE's pretraining augmentation on uint8: random resized crop (bicubic, antialiased) and horizontal flip
    ``(C, H, W)`` uint8 (or a decoded PIL image) -> ``(C, S, S)`` uint8; normalisation happens on the device
    (``DeviceNormalize``).

    Why not PIL: torchvision's uint8 resize kernels on the crop alone run ~2.5x faster than PIL's bicubic resize
    here, and workers then hand over a quarter of float32's bytes. Parameters come from ``sample_generator()``
    (per-sample seeded, no global state)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.hflip, self.ratio = size, tuple(scale), hflip, tuple(ratio)

    def draw(self, height: int, width: int) -> tuple[int, int, int, int, int]:
        """The crop and flip ``(top, left, h, w, flip)`` of an ``height x width`` image, from ``sample_generator()``."""
        rng = sample_generator()
        top, left, h, w = crop_params(height, width, self.scale, self.ratio, rng)
        return top, left, h, w, int(self.hflip > 0 and rng.random() < self.hflip)

    def __call__(self, img: Tensor | Image.Image) -> Tensor:
        x = pil_to_u8(img) if isinstance(img, Image.Image) else img
        return resized_crop_u8(x, self.draw(x.shape[-2], x.shape[-1]), self.size).contiguous()


class DeviceNormalize:
    """uint8 ``(N, C, H, W)`` images -> float32 ``(x / 255 - mean) / std`` on their device (the same arithmetic as
    ``ToTensor`` + ``Normalize``); float input passes through unchanged (already normalised). The statistics are
    cached per device, so a training step makes no host-to-device copy for them."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            return x
        if x.device not in self._cache:
            self._cache[x.device] = (torch.tensor(self.mean, device=x.device).view(-1, 1, 1),
                                     torch.tensor(self.std, device=x.device).view(-1, 1, 1))
        mean, std = self._cache[x.device]
        return x.float().div_(255).sub_(mean).div_(std)


class DeferredCropU8(RandomResizedCropU8):
    """``data.decode=gpu``: the same random crop and flip as ``RandomResizedCropU8``, drawn in the worker from the
    JPEG's header size, applied on the device after decoding (``DeviceDecoder``). Input: what
    ``jpeg_or_image`` returns; an image it had to decode already is cropped here instead."""

    def __call__(self, img: Any) -> JpegItem:
        if isinstance(img, JpegFile):
            return JpegItem(img.data, self.draw(img.height, img.width), name=img.name)
        return JpegItem(None, (0, 0, 0, 0, 0), super().__call__(img))


class DecodeCrop:
    """The CPU path's second phase (``SeededSamples(finish=...)``): a ``JpegItem`` -> its crop ``(in_chans, S, S)``
    uint8 (``decode_bytes``, then ``resized_crop_u8``: the pixels of ``RandomResizedCropU8`` on the same draw); a
    ready item as it is; :class:`BadImageError` naming the file if it cannot be decoded.

    Why two phases: decoding the batch's images back to back, after the Python bookkeeping of all its items (crop
    draws, masks), measured 7-14 % faster per core than interleaving them (``benchmarks/input_pipeline.py``):
    the decoder and the interpreter each keep their caches warm."""

    def __init__(self, size: int, in_chans: int) -> None:
        self.size, self.in_chans = size, in_chans

    def __call__(self, item: JpegItem) -> Tensor:
        if item.ready is not None:
            return item.ready
        # the worker's jpeg_or_image read the header and made a JpegItem only of an upright JPEG (orientation 1)
        x = decode_bytes(item.data, self.in_chans, item.name, orientation=1)
        return resized_crop_u8(x, item.box, self.size)


class DeviceDecoder:
    """``JpegBatch`` -> ``(N, in_chans, S, S)`` uint8 on ``device``: one batched ``decode_jpeg_batch`` (nvJPEG on
    CUDA), then each image's crop (``resized_crop_u8``) there; ready items are moved as they are. A tensor batch
    (the CPU path) passes through unchanged.

    The crops are resized one image at a time: random resized crops have a different size per image (a batch of
    them almost never shares one), and the antialiased bicubic resize, which must equal the CPU path's
    (``resized_crop_u8``), has no batched kernel for inputs of different sizes (``roi_align`` is bilinear without
    antialiasing). Per image it is one crop view and one resize kernel, next to the decode's batched call.

    A file whose header read but which no decoder takes is found only here, in the main process, too late to be
    replaced by the next file as the workers do: it becomes a flat mid-gray image (a near-zero loss) and a warning
    naming it, instead of ending the run."""

    def __init__(self, size: int, in_chans: int) -> None:
        self.size, self.in_chans = size, in_chans

    def __call__(self, batch: Tensor | JpegBatch, device: torch.device | str) -> Tensor:
        if not isinstance(batch, JpegBatch):
            return batch
        todo = [it for it in batch.items if it.ready is None]
        decoded = iter(decode_jpeg_batch([it.data for it in todo], self.in_chans, device))
        # ready crops came with the batch (JpegBatch.to: from pinned memory); .to is then a no-op
        return torch.stack([it.ready.to(device) if it.ready is not None else self._crop(next(decoded), it, device)
                            for it in batch.items])

    def _crop(self, x: Tensor | None, item: JpegItem, device: torch.device | str) -> Tensor:
        if x is not None:
            return resized_crop_u8(x, item.box, self.size)
        logger.warning("unreadable image replaced by a gray one (data.decode=gpu): %s", item.name)
        return torch.full((self.in_chans, self.size, self.size), 128, dtype=torch.uint8, device=device)


def build_pretrain_transform(input_size: int = 224, crop_scale: tuple[float, float] = (0.2, 1.0),
                             hflip: float = 0.5, in_chans: int = 3) -> RandomResizedCropU8:
    """FCMAE pretraining augmentation: random resized crop (bicubic), flip -> ``(C, S, S)`` uint8 (normalised on
    the device by ``DeviceNormalize(*mean_std(in_chans))``)."""
    check_in_chans(in_chans)
    return RandomResizedCropU8(input_size, tuple(crop_scale), hflip)


def eval_resize(input_size: int, crop_pct: float) -> int:
    """The shorter side before the evaluation's centre crop: ``input_size / crop_pct`` (224 / 0.875 -> 256, not 255
    from rounding error)."""
    return int(math.floor(input_size / crop_pct + 1e-6))


def build_eval_transform(input_size: int = 224, crop_pct: float = 224 / 256, in_chans: int = 3) -> T.Compose:
    """Resize the shorter side to ``input_size / crop_pct`` (bicubic), center crop, normalise -> ``(C, S, S)``."""
    mean, std = mean_std(in_chans)
    return T.Compose([
        T.Resize(eval_resize(input_size, crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(input_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class ResizeCenterCropU8:
    """The evaluation transform on uint8 tensors (shards): shorter side to ``input_size / crop_pct`` (bicubic,
    antialiased), centre crop -> ``(C, S, S)`` uint8, normalised on the device."""

    def __init__(self, input_size: int = 224, crop_pct: float = 224 / 256) -> None:
        self.size, self.resize = input_size, eval_resize(input_size, crop_pct)

    def __call__(self, x: Tensor) -> Tensor:
        x = TF.resize(x, [self.resize], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(x, [self.size, self.size]).contiguous()


def _posterize_safe(auto_augment: str | None) -> str | None:
    """Cap RandAugment's magnitude at 9 for the increasing op set (``inc1``) unless ``mmax`` is given: at magnitude 10
    timm's increasing posterize keeps 0 bits, which Pillow >= 11 refuses (``bits must be between or equal to 1 and
    8``), ending a fine-tuning run at about one image in 300 with the paper's ``rand-m9-mstd0.5-inc1``. Magnitudes
    drawn above 9 (m9 + N(0, 0.5) noise: ~2 % of draws) become 9."""
    if auto_augment and auto_augment.startswith("rand") and "inc1" in auto_augment and "mmax" not in auto_augment:
        return f"{auto_augment}-mmax9"
    return auto_augment


class _PILToU8:
    """PIL image -> ``(C, H, W)`` uint8 tensor (a class, so DataLoader workers can pickle it)."""

    def __call__(self, img: Image.Image) -> Tensor:
        return pil_to_u8(img)


def build_finetune_transform(input_size: int = 224, in_chans: int = 3,
                             auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                             color_jitter: float | None = 0.4, scale: tuple[float, float] = (0.08, 1.0),
                             hflip: float = 0.5, interpolation: str = "bicubic") -> Callable[[Image.Image], Tensor]:
    """timm's training augmentation up to the tensor (random resized crop, flip, RandAugment / colour jitter) ->
    ``(C, S, S)`` uint8; normalisation and random erasing run on the device (``DeviceNormalize``,
    ``DeviceRandomErasing``), on the batch.

    timm's RandAugment works on RGB images, so for ``in_chans=1`` the gray image is replicated to RGB, augmented
    on all three channels and cut back to its first channel; every op keeps the three channels equal.
    """
    from timm.data import create_transform

    mean, std = mean_std(in_chans)  # RandAugment fills rotated/sheared borders with the mean (equal gray channels)
    pil_ops = create_transform(input_size, is_training=True, scale=tuple(scale), hflip=hflip,
                               color_jitter=color_jitter, auto_augment=_posterize_safe(auto_augment) or None,
                               interpolation=interpolation, mean=mean * (3 // len(mean)), std=std * (3 // len(std)),
                               re_prob=0.0, separate=True)[:2]  # no ToTensor/Normalize
    ops: list[Any] = [_ToRGB(), T.Compose([*pil_ops]), _PILToU8()]
    return T.Compose(ops if in_chans == 3 else [*ops, _FirstChannels(1)])


class DeviceRandomErasing:
    """timm's random erasing on a normalised float batch ``(N, C, H, W)`` on its device (in place), as timm's
    training transform applies it to each normalised image in the workers; its random draws come from the device's
    and Python's generators of the main process (saved with every checkpoint).

    Per image, as timm does: each erased rectangle has its own size (drawn on the host with Python's generator, as
    timm draws it), so a batched version would need those sizes on the device (a host-to-device copy of the box
    table every step) to save ~3 small kernel launches per erased image (probability 0.25 in the paper's recipe:
    ~100 launches, well under 1 ms, for a batch of 128 against a step of hundreds of ms)."""

    def __init__(self, probability: float, mode: str = "pixel", count: int = 1) -> None:
        self.probability, self.mode, self.count = probability, mode, count
        self._by_device: dict[torch.device, Any] = {}

    def __call__(self, x: Tensor) -> Tensor:
        if self.probability <= 0:
            return x
        if x.device not in self._by_device:
            from timm.data.random_erasing import RandomErasing

            self._by_device[x.device] = RandomErasing(self.probability, mode=self.mode, max_count=self.count,
                                                      device=str(x.device))
        return self._by_device[x.device](x)


class ViaPIL:
    """``(C, H, W)`` uint8 -> PIL image -> ``transform`` (timm's PIL transforms on decoded shard samples)."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, x: Any) -> Any:
        from PIL import Image

        a = x.permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(a[..., 0] if a.shape[2] == 1 else a))
