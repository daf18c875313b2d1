"""Image decoding to uint8 tensors: libjpeg-turbo through torchvision for JPEGs, PIL for everything else.

Why not PIL for all: measured per core (``benchmarks/input_pipeline.py``), ``torchvision.io.decode_jpeg`` decodes
ImageNet-like JPEGs ~1.5x faster than PIL and returns the ``(C, H, W)`` uint8 tensor the rest of the pipeline
works on, with no PIL -> NumPy -> tensor copy. The fast path takes only what it handles exactly like PIL would:
a complete JPEG (SOI ... EOI; a truncated file goes to PIL, which refuses it, so it is skipped as before) in a
colour space libjpeg converts (gray, YCbCr, CMYK -> RGB), with the EXIF orientation applied. Any file it refuses,
and every other format (PNG, WebP, palette, alpha, 16-bit ...), is decoded by ``load_image`` (PIL), as before.

``decode_jpeg_batch`` decodes a list of JPEG byte strings at once on any device: on CUDA that is nvJPEG (the
``data.decode=gpu`` option); on CPU the same function is the fallback, and what the tests exercise.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fcmae.data.images import BadImageError, check_in_chans, load_image

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


def pil_to_u8(img: Image.Image) -> Tensor:
    """A decoded ``L``/``RGB`` PIL image -> ``(C, H, W)`` uint8 tensor (one copy)."""
    a = np.array(img, dtype=np.uint8)
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def is_complete_jpeg(data: bytes) -> bool:
    """JPEG start marker first and end marker last (trailing padding allowed): not a truncated file."""
    return data[:2] == _SOI and _EOI in data[-16:]


def _jpeg_mode(in_chans: int):  # noqa: ANN202 - torchvision's enum
    from torchvision.io import ImageReadMode

    return ImageReadMode.GRAY if check_in_chans(in_chans) == 1 else ImageReadMode.RGB


def decode_jpeg_bytes(data: bytes, in_chans: int) -> Tensor | None:
    """libjpeg-turbo decode of a complete JPEG -> ``(in_chans, H, W)`` uint8, or None when it should go to PIL."""
    if not is_complete_jpeg(data):
        return None
    from torchvision.io import decode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a libjpeg warning means damaged data: let PIL decide
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here): not damage
            warnings.simplefilter("ignore", DeprecationWarning)
            x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_jpeg_mode(in_chans),
                            apply_exif_orientation=True)
    except Exception:  # 12-bit, arithmetic-coded, damaged: PIL's turn
        return None
    return x if x.shape[0] == in_chans else None


def read_image_u8(path: str | Path, in_chans: int = 3) -> Tensor:
    """Decode one image file -> ``(in_chans, H, W)`` uint8; :class:`BadImageError` naming the file if unreadable."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BadImageError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from exc
    x = decode_jpeg_bytes(data, in_chans)
    return x if x is not None else pil_to_u8(load_image(p, in_chans))


def decode_jpeg_batch(datas: Sequence[bytes], in_chans: int = 3, device: torch.device | str = "cpu"
                      ) -> list[Tensor]:
    """Decode JPEG byte strings on ``device`` (nvJPEG on CUDA, in one batched call) -> ``(in_chans, H_i, W_i)``
    uint8 tensors there. A string the batched decoder refuses is decoded alone on the CPU (PIL if need be) and
    moved to ``device``, so one odd file does not fail the batch."""
    from torchvision.io import decode_jpeg

    bufs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # see decode_jpeg_bytes
            out = decode_jpeg(bufs, mode=_jpeg_mode(in_chans), device=device, apply_exif_orientation=True)
        if all(x.shape[0] == in_chans for x in out):
            return list(out)
    except Exception:
        pass
    return [_decode_one(d, in_chans).to(device) for d in datas]


def _decode_one(data: bytes, in_chans: int) -> Tensor:
    x = decode_jpeg_bytes(data, in_chans)
    if x is not None:
        return x
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            from fcmae.data.images import to_model_mode

            return pil_to_u8(to_model_mode(img, in_chans))
    except Exception as exc:
        raise BadImageError(f"cannot decode image bytes: {type(exc).__name__}: {exc}") from exc
