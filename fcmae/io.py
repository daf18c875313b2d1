"""Reading and writing weight files: safetensors or torch pickles, plain or wrapped state dicts, atomically.

``load_state_dict_file`` accepts ``.safetensors`` files (with their string metadata), ``.pt/.pth/.bin`` files
read with ``torch.load(weights_only=True)`` (never arbitrary pickles), and directories written by accelerate's
``save_state`` (``model.safetensors`` or ``pytorch_model.bin`` inside). A training checkpoint that wraps the
weights (``{"model": ..., "optimizer": ...}``) is unwrapped. Anything else raises ``CheckpointError`` with a
one-line message naming the file and the problem.

``save_state_dict`` writes safetensors unless the suffix is ``.pt``/``.pth``; the file appears complete or not
at all (temp file in the same directory, fsync, ``os.replace``).
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

StateDict = dict[str, Tensor]

# a training checkpoint's dict may hold the weights under one of these keys; the first present wins
WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
# what accelerate's save_state writes for the first prepared model, in order of preference
ACCELERATE_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth")


class CheckpointError(ValueError):
    """The file is not a checkpoint we can read; the message names the file and the problem."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _looks_like_safetensors(path: Path) -> bool:
    """Sniff the header: an 8-byte little-endian JSON length, then ``{``."""
    try:
        head = _read_head(path, 9)
    except CheckpointError:
        return False
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < size <= path.stat().st_size - 8


def _read_head(path: Path, n: int = 8) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({_one_line(exc)})") from exc


def _torch_load_problem(exc: BaseException) -> str:
    """One line for a ``torch.load(weights_only=True)`` failure (its own messages run to several paragraphs)."""
    text = str(exc)
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"pickle holds a {m[1]} object, which torch.load(weights_only=True) refuses"
    if m := re.search(r"WeightsUnpickler error:\s*(.+)", text):
        return f"pickle holds objects other than tensors (torch.load weights_only=True: {m[1].strip()})"
    return f"not a readable PyTorch checkpoint ({_one_line(exc)})"


def _resolve(path: Path) -> Path:
    """A file, or the model file inside an accelerate ``save_state`` directory."""
    if path.is_dir():
        for name in ACCELERATE_MODEL_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{path}: directory holds no model weights (expected {' or '.join(ACCELERATE_MODEL_FILES)}, "
            "as written by accelerate save_state)"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    return path


def _unwrap(obj: Any) -> tuple[Any, dict[str, str]]:
    """``{"model": sd, ...}`` -> ``(sd, metadata)``; metadata from a string-valued ``metadata`` entry if any."""
    metadata: dict[str, str] = {}
    if isinstance(obj, Mapping):
        md = obj.get("metadata")
        if isinstance(md, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
            metadata = dict(md)
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner, metadata
    return obj, metadata


def _check_state_dict(obj: Any, path: Path) -> StateDict:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not obj:
        raise CheckpointError(f"{path}: state dict is empty")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if len(bad) == len(obj):
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise CheckpointError(f"{path}: dict holds no tensors (keys: {shown})")
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise CheckpointError(f"{path}: not a state dict: {len(bad)} entries are not named tensors ({shown})")
    return dict(obj)


def load_state_dict_file(path: str | os.PathLike[str]) -> tuple[StateDict, dict[str, str]]:
    """Read a weight file or accelerate checkpoint directory -> ``(state_dict, metadata)`` on CPU.

    Tensors keep their stored shapes and dtypes; ``metadata`` is the safetensors header metadata (or the
    ``metadata`` entry of a ``.pt`` written by ``save_state_dict``), ``{}`` when there is none.
    """
    src = _resolve(Path(path))
    if src.suffix == ".safetensors" or _looks_like_safetensors(src):
        try:
            sd = load_file(str(src), device="cpu")
            with safe_open(str(src), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types; all mean "not readable"
            raise CheckpointError(f"{src}: not a readable safetensors file ({_one_line(exc)})") from exc
        return _check_state_dict(sd, src), metadata
    head = _read_head(src)
    if not head:
        raise CheckpointError(f"{src}: file is empty")
    # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle starting with the PROTO opcode)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{src}: not a PyTorch or safetensors checkpoint (unrecognised file header)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the refusal below says enough
            obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as exc:  # bad zip, refused pickle, truncated file: all "not a checkpoint we can read"
        raise CheckpointError(f"{src}: {_torch_load_problem(exc)}") from exc
    sd, metadata = _unwrap(obj)
    return _check_state_dict(sd, src), metadata


def _prepare(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Detached, contiguous CPU tensors that own their storage (safetensors refuses shared storage)."""
    out: StateDict = {}
    seen: set[int] = set()
    for key, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        # clone views into larger buffers and tensors aliasing one already written
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. Windows); the replace itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_state_dict(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` atomically: safetensors, or ``{"model": sd, "metadata": md}`` for ``.pt``/``.pth``.

    Metadata values are stored as strings. Returns the path written.
    """
    dst = Path(path)
    md = {str(k): str(v) for k, v in (metadata or {}).items()}
    sd = _prepare(state_dict)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if dst.suffix in TORCH_SUFFIXES:
            torch.save({"model": sd, "metadata": md}, tmp)
        else:
            save_file(sd, str(tmp), metadata=md)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    return dst
