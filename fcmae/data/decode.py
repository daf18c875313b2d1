"""Image decoding to uint8 tensors: libjpeg-turbo through torchvision for JPEGs, PIL for everything else.

Why not PIL for all: measured per core (``benchmarks/input_pipeline.py``), ``torchvision.io.decode_jpeg`` decodes
ImageNet-like JPEGs ~1.5x faster than PIL and returns the ``(C, H, W)`` uint8 tensor the rest of the pipeline
works on, with no PIL -> NumPy -> tensor copy. The fast path takes only what it handles exactly like PIL would:
a complete JPEG (SOI ... EOI; a truncated file goes to PIL, which refuses it, so it is skipped as before) in a
colour space libjpeg converts (gray, YCbCr, CMYK -> RGB), with the EXIF orientation applied. Any file it refuses,
and every other format (PNG, WebP, palette, alpha, 16-bit ...), is decoded by ``load_image`` (PIL), as before.

``decode_jpeg_batch`` decodes a list of JPEG byte strings at once on any device: on CUDA that is nvJPEG (the
``data.decode=gpu`` option, whose worker side is ``read_jpeg_or_image`` and ``JpegItem``/``JpegBatch``); on CPU
the same function is the fallback, and what the tests exercise.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

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


def read_file(path: str | Path) -> bytes:
    """A file's bytes; :class:`BadImageError` naming the file if it cannot be read."""
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise BadImageError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from exc


def decode_bytes(data: bytes, in_chans: int, name: str = "image bytes") -> Tensor:
    """An encoded image -> ``(in_chans, H, W)`` uint8: libjpeg-turbo for a complete JPEG, else PIL (``load_image``:
    every format, EXIF orientation, odd modes); :class:`BadImageError` naming ``name`` if neither can."""
    x = decode_jpeg_bytes(data, in_chans)
    return x if x is not None else pil_to_u8(load_image(io.BytesIO(data), in_chans, name=name))


def read_image_u8(path: str | Path, in_chans: int = 3) -> Tensor:
    """Decode one image file -> ``(in_chans, H, W)`` uint8 (read once, decoded by ``decode_bytes``);
    :class:`BadImageError` naming the file if unreadable."""
    return decode_bytes(read_file(path), in_chans, name=str(path))


def decode_jpeg_batch(datas: Sequence[bytes], in_chans: int = 3, device: torch.device | str = "cpu"
                      ) -> list[Tensor]:
    """Decode JPEG byte strings on ``device`` (nvJPEG on CUDA, in one batched call) -> ``(in_chans, H_i, W_i)``
    uint8 tensors there. When the batched decoder refuses one, each is decoded alone on the CPU (``decode_bytes``:
    PIL if need be) and moved to ``device``, so one odd file does not fail the batch."""
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
    return [decode_bytes(d, in_chans).to(device) for d in datas]


# --------------------------------------------------------------------------------------------- data.decode=gpu
class JpegFile(NamedTuple):
    """A complete JPEG's bytes and its decoded (EXIF-upright) size, read from the header alone."""

    data: bytes
    height: int
    width: int


class JpegItem:
    """One image for device decoding: the file's JPEG bytes and its crop ``(top, left, h, w, flip)`` in the
    decoded (EXIF-upright) image; or, for a file the device decoder cannot take, the finished ``ready`` crop."""

    __slots__ = ("data", "box", "ready")

    def __init__(self, data: bytes | None, box: tuple[int, int, int, int, int], ready: Tensor | None = None) -> None:
        self.data, self.box, self.ready = data, box, ready


class JpegBatch:
    """A batch of ``JpegItem``: what the DataLoader hands over with ``data.decode=gpu``. ``to(device)`` keeps the
    bytes on the host (the decoder reads them from there); ``fcmae.data.transforms.DeviceDecoder`` turns it into
    ``(N, C, S, S)`` uint8."""

    def __init__(self, items: list[JpegItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> JpegBatch:  # noqa: ARG002
        return self

    def pin_memory(self) -> JpegBatch:
        return self


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a complete JPEG as ``decode_jpeg(apply_exif_orientation=True)`` returns it (EXIF
    rotations by 90 degrees swap the sides), read from the header only; None when it is not one."""
    if not is_complete_jpeg(data):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                return None
            w, h = img.size
            turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return None
    return (w, h) if turned else (h, w)


def read_jpeg_or_image(path: str | Path, in_chans: int = 3) -> JpegFile | Tensor:
    """``data.decode=gpu`` reader: a complete JPEG as a ``JpegFile`` (decoded later, on the device), else the
    decoded ``(in_chans, H, W)`` uint8 image; :class:`BadImageError` naming the file if unreadable."""
    data = read_file(path)
    hw = jpeg_size(data)
    return JpegFile(data, *hw) if hw is not None else decode_bytes(data, in_chans, name=str(path))


def collate_samples(batch: list) -> object:
    """The DataLoader's collate: ``default_collate``, except that ``JpegItem`` images become one ``JpegBatch``."""
    from torch.utils.data import default_collate

    first = batch[0]
    if not isinstance(first[0], JpegItem):
        return default_collate(batch)
    rest = default_collate([tuple(item[1:]) for item in batch])
    return type(first)(JpegBatch([item[0] for item in batch]), *rest)
