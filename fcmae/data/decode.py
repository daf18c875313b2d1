"""Image decoding to uint8 tensors: libjpeg-turbo (through simplejpeg) for JPEGs, PIL for everything else.

Why not PIL for all: measured per core (``benchmarks/input_pipeline.py``), libjpeg-turbo through simplejpeg decodes
ImageNet-like JPEGs ~1.5x faster than PIL, with the same pixels, and hands back a NumPy array the tensor views
without a copy. Why simplejpeg rather than ``torchvision.io.decode_jpeg``: the same library and pixels, but ~8 %
faster here, and its ``strict`` mode raises on a damaged file, where torchvision's decoder only warns (catching
warnings per image made our torchvision wrapper another ~15 % slower). The fast path takes only
what it decodes exactly like PIL: a complete JPEG (SOI ... EOI; a truncated file goes to PIL, which refuses it, so
it is skipped as before) in YCbCr or gray; the EXIF/XMP orientation is read by PIL from the header when the file
has an APP1 segment, and applied to the tensor. Any file it refuses, and every other format (CMYK JPEG, PNG, WebP,
palette, alpha, 16-bit ...), is decoded by ``load_image`` (PIL), as before.

``decode_jpeg_batch`` decodes a list of JPEG byte strings at once on any device: on CUDA that is nvJPEG (the
``data.decode=gpu`` option, whose worker side is ``jpeg_or_image`` and ``JpegItem``/``JpegBatch``); on CPU
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

from fcmae.data.images import BadImageError, check_in_chans, decode_pil, read_file

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


class JpegHeader(NamedTuple):
    """What the fast path needs from a JPEG's header: the decoded (upright) size and the EXIF orientation (1-8)."""

    height: int
    width: int
    orientation: int


def _has_app1(data: bytes) -> bool | None:
    """Whether the markers before the scan hold an APP1 segment (EXIF or XMP: where an orientation can be);
    None when the marker chain is malformed (PIL's turn)."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: no more header segments
            return False
        if marker == 0xE1:
            return True
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _pil_orientation(data: bytes) -> int | None:
    """The orientation PIL's ``exif_transpose`` would apply (EXIF, else XMP), read from the header; None if the
    header cannot be parsed (the whole file then goes to PIL, which decides)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            o = img.getexif().get(0x0112, 1)
    except Exception:
        return None
    return o if o in range(1, 9) else 1


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a complete YCbCr or gray JPEG (what the fast path decodes exactly like PIL); None for anything
    else: truncated, CMYK/YCCK/Adobe RGB, another format, an unreadable header."""
    import simplejpeg

    if not is_complete_jpeg(data):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:
        return None
    app1 = _has_app1(data)
    orientation = 1 if app1 is False else _pil_orientation(data) if app1 else None
    if colorspace not in ("YCbCr", "Gray") or orientation is None:
        return None
    return JpegHeader(w, h, orientation) if orientation >= 5 else JpegHeader(h, w, orientation)


# EXIF orientation -> (swap H and W first, then flip these dims): PIL's exif_transpose on a (C, H, W) tensor
_UPRIGHT = {1: (False, ()), 2: (False, (-1,)), 3: (False, (-2, -1)), 4: (False, (-2,)),
            5: (True, ()), 6: (True, (-1,)), 7: (True, (-2, -1)), 8: (True, (-2,))}


def upright(x: Tensor, orientation: int) -> Tensor:
    """``(C, H, W)`` as stored -> as shown, for EXIF ``orientation`` 1-8 (the transposes of PIL's
    ``ImageOps.exif_transpose``: 5 transpose, 6 rotate 90 degrees clockwise, 7 transverse, 8 counter-clockwise)."""
    swap, dims = _UPRIGHT[orientation]
    x = x.transpose(-1, -2) if swap else x
    return x.flip(dims) if dims else x


def decode_jpeg_bytes(data: bytes, in_chans: int, orientation: int | None = None) -> Tensor | None:
    """libjpeg-turbo decode of a complete YCbCr/gray JPEG -> ``(in_chans, H, W)`` uint8 (upright; a view of the
    channels-last array, the layout torch's uint8 resize kernels read), or None when it should go to PIL.
    ``orientation``: given when ``jpeg_header`` already accepted these bytes (its header is not read again)."""
    import simplejpeg

    if orientation is None:
        head = jpeg_header(data)
        if head is None:
            return None
        orientation = head.orientation
    try:  # strict: a recoverable libjpeg error (damaged data) raises, so PIL decides
        a = simplejpeg.decode_jpeg(data, "GRAY" if check_in_chans(in_chans) == 1 else "RGB", strict=True)
    except Exception:  # 12-bit, arithmetic-coded, damaged: PIL's turn
        return None
    return upright(torch.from_numpy(a).permute(2, 0, 1), orientation)


def decode_bytes(data: bytes, in_chans: int, name: str = "image bytes", orientation: int | None = None) -> Tensor:
    """An encoded image -> ``(in_chans, H, W)`` uint8: libjpeg-turbo for a complete JPEG, else PIL (``load_image``:
    every format, EXIF orientation, odd modes); :class:`BadImageError` naming ``name`` if neither can.
    ``orientation``: see ``decode_jpeg_bytes``."""
    x = decode_jpeg_bytes(data, in_chans, orientation)
    return x if x is not None else pil_to_u8(decode_pil(data, in_chans, name))


def read_image_u8(path: str | Path, in_chans: int = 3) -> Tensor:
    """Decode one image file -> ``(in_chans, H, W)`` uint8 (read once, decoded by ``decode_bytes``);
    :class:`BadImageError` naming the file if unreadable."""
    return decode_bytes(read_file(path), in_chans, name=str(path))


def decode_jpeg_batch(datas: Sequence[bytes], in_chans: int = 3, device: torch.device | str = "cpu"
                      ) -> list[Tensor | None]:
    """Decode JPEG byte strings on ``device`` (nvJPEG on CUDA, in one batched call) -> ``(in_chans, H_i, W_i)``
    uint8 tensors there. When the batched decoder refuses one, each is decoded alone on the CPU (``decode_bytes``:
    PIL if need be) and moved to ``device``, so one odd file does not fail the batch; None for one that no decoder
    takes."""
    from torchvision.io import decode_jpeg

    bufs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here)
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg(bufs, mode=_jpeg_mode(in_chans), device=device, apply_exif_orientation=True)
        if all(x.shape[0] == in_chans for x in out):
            return list(out)
    except Exception:
        pass
    return [_decode_or_none(d, in_chans, device) for d in datas]


def _decode_or_none(data: bytes, in_chans: int, device: torch.device | str) -> Tensor | None:
    try:
        x = decode_bytes(data, in_chans)
        if torch.device(device).type == "cuda":  # decoded here, in the main process: copy it asynchronously
            return x.pin_memory().to(device, non_blocking=True)
        return x.to(device)
    except BadImageError:
        return None


# --------------------------------------------------------------------------------------------- data.decode=gpu
class JpegFile(NamedTuple):
    """A complete JPEG's bytes and its decoded (EXIF-upright) size, read from the header alone; ``name``: the
    file, for error messages."""

    data: bytes
    height: int
    width: int
    name: str = "image bytes"


class JpegItem:
    """One image to decode later (``DecodeCrop`` in the worker, or ``DeviceDecoder`` on the device): the file's
    JPEG bytes, its crop ``(top, left, h, w, flip)`` in the decoded (EXIF-upright) image and its ``name``; or, for
    a file the fast path cannot take, the finished ``ready`` crop."""

    __slots__ = ("data", "box", "ready", "name")

    def __init__(self, data: bytes | None, box: tuple[int, int, int, int, int], ready: Tensor | None = None,
                 name: str = "image bytes") -> None:
        self.data, self.box, self.ready, self.name = data, box, ready, name


class JpegBatch:
    """A batch of ``JpegItem``: what the DataLoader hands over with ``data.decode=gpu``. ``to(device)`` keeps the
    bytes on the host (the decoder reads them from there); ``fcmae.data.transforms.DeviceDecoder`` turns it into
    ``(N, C, S, S)`` uint8."""

    def __init__(self, items: list[JpegItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> JpegBatch:
        """The JPEG bytes stay on the host (the decoder reads them there); the finished crops (``ready``: other
        formats, odd JPEGs) move with the batch, like any batch tensor (non-blocking from pinned memory)."""
        for it in self.items:
            if it.ready is not None:
                it.ready = it.ready.to(device, non_blocking=non_blocking)
        return self

    def pin_memory(self) -> JpegBatch:
        """The DataLoader's pin-memory thread (on CUDA): the finished crops into pinned memory, so their copy to the
        device is asynchronous (from pageable memory it would be a synchronous staging copy)."""
        for it in self.items:
            if it.ready is not None:
                it.ready = it.ready.pin_memory()
        return self


def jpeg_or_image(data: bytes, in_chans: int = 3, name: str = "image bytes") -> JpegFile | Tensor:
    """``data.decode=gpu`` decoder (of a file's bytes): a JPEG the fast path takes, stored upright, as a
    ``JpegFile`` (decoded later, on the device); else (another format, an odd or EXIF-rotated JPEG) the decoded
    ``(in_chans, H, W)`` uint8 image; :class:`BadImageError` naming ``name`` if it cannot be decoded."""
    head = jpeg_header(data)
    if head is not None and head.orientation == 1:
        return JpegFile(data, head.height, head.width, name)
    return decode_bytes(data, in_chans, name=name)


def collate_samples(batch: list) -> object:
    """The DataLoader's collate: ``default_collate``, except that ``JpegItem`` images become one ``JpegBatch``."""
    from torch.utils.data import default_collate

    first = batch[0]
    if not isinstance(first[0], JpegItem):
        return default_collate(batch)
    rest = default_collate([tuple(item[1:]) for item in batch])
    return type(first)(JpegBatch([item[0] for item in batch]), *rest)
