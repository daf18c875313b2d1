"""Reading and writing weight files: safetensors or torch pickles, plain or wrapped state dicts, atomically.

``read_checkpoint`` / ``load_state_dict_file`` accept ``.safetensors`` files (with their string metadata),
``.pt/.pth/.bin`` files, and folders holding ``model.safetensors`` or ``pytorch_model.bin`` (accelerate's
``save_state``, timm ``local-dir`` and Hugging Face ``save_pretrained`` folders). A training checkpoint that wraps
the weights (``{"model": ..., "optimizer": ...}``, the official trainer's ``checkpoint-N.pth`` with its pickled
``argparse.Namespace`` in ``args``) is unwrapped; ``ema=True`` takes ``model_ema`` / ``state_dict_ema`` instead.

Pickles are read with ``torch.load(weights_only=True)`` with exactly one class allowed beyond torch's tensor
types: ``argparse.Namespace`` (``SAFE_GLOBALS``). Any other global in the pickle is refused with a one-line
message naming it, and no code from the file runs. Anything unreadable raises ``WeightFileError`` with a one-line
message naming the file and the problem.

``save_state_dict`` writes safetensors unless the suffix is ``.pt``/``.pth``; the file appears complete or not
at all (temp file in the same directory, fsync, ``os.replace``). ``save_folder`` does the same for a folder.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import math
import os
import pickletools
import re
import shutil
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

StateDict = dict[str, Tensor]

# a training checkpoint's dict may hold the weights under one of these keys; the first present wins
WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
# EMA weights: the official trainer (``model_ema``), timm's train.py (``state_dict_ema``); used with ``ema=True``
EMA_KEYS = ("model_ema", "state_dict_ema")
# the only classes a pickle may hold beyond torch's own tensor/container types: the official trainer saves its
# command line as ``args`` (an ``argparse.Namespace`` of plain values)
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
# how much of a legacy (non-zip) pickle file is scanned to name a refused global in an error message
_SCAN_LIMIT = 64 << 20
# what accelerate's save_state writes for the first prepared model, in order of preference
ACCELERATE_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth")


class WeightFileError(ValueError):
    """The file is not a checkpoint we can read; the message names the file and the problem."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _looks_like_safetensors(path: Path) -> bool:
    """Sniff the header: an 8-byte little-endian JSON length, then ``{``."""
    try:
        head = _read_head(path, 9)
    except WeightFileError:
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
        raise WeightFileError(f"{path}: cannot read ({_one_line(exc)})") from exc


def _refused_message(names: list[str]) -> str:
    allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS)
    shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
    return (f"pickle references {shown}, which {'is' if len(names) == 1 else 'are'} refused (only tensors, plain "
            f"containers and {allowed} are loaded; nothing from the file was run)")


def _torch_load_problem(exc: BaseException, path: Path) -> str:
    """One line for a failed safe ``torch.load`` (its own messages run to several paragraphs).

    Names every global the pickle references that safe loading refuses (torch stops at the first, or, for
    pickle opcodes it does not parse, names none).
    """
    text = str(exc)
    named = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if named or "WeightsUnpickler error" in text or "Weights only load failed" in text:
        refused = refused_globals(path)
        if named and named[1] not in refused:
            refused.insert(0, named[1])
        if refused:
            return _refused_message(refused)
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        reason = " ".join(detail[1].split()) if detail else "unsupported content"
        return f"pickle holds something other than tensors and plain values ({reason})"
    return f"not a readable PyTorch checkpoint ({_one_line(exc)})"


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of a ``torch.save`` file: ``*/data.pkl`` of the zip archive, else the file's start."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            return zf.read(names[0]) if names else b""
    with path.open("rb") as f:
        return f.read(_SCAN_LIMIT)


def pickle_globals(data: bytes) -> list[str]:
    """Every global (``module.name``) that unpickling ``data`` would import, in order; nothing is executed.

    Walks the opcodes with ``pickletools`` (a disassembler), following the memo for ``STACK_GLOBAL``'s two
    string arguments. Consecutive pickles (the legacy ``torch.save`` format) are scanned until the data stops
    parsing.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        recent: list[Any] = []  # values pushed, None for anything that is not a string
        memo: dict[int, Any] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                    recent.append(None)
                elif op.name == "STACK_GLOBAL":
                    mod, name = recent[-2:] if len(recent) >= 2 else (None, None)
                    found.append(f"{mod}.{name}" if isinstance(mod, str) and isinstance(name, str) else "?")
                    recent.append(None)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = recent[-1] if recent else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(int(arg)))
                elif op.name not in ("FRAME", "PROTO", "STOP"):
                    recent.append(arg if isinstance(arg, str) else None)
        except Exception:  # data after the last pickle (legacy format tensor bytes) or a damaged stream
            break
    return found


def _is_allowed(name: str) -> bool:
    """Whether the safe loader accepts global ``module.name``: torch's own list plus ``SAFE_GLOBALS``."""
    if name in {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}:
        return True
    try:
        from torch import _weights_only_unpickler

        return name in _weights_only_unpickler._get_allowed_globals()
    except (ImportError, AttributeError):  # private API moved: only used for messages, so guess
        return name.startswith("torch.") or name == "collections.OrderedDict"


def refused_globals(path: str | os.PathLike[str]) -> list[str]:
    """Globals in a ``torch.save`` file (or plain pickle) that safe loading refuses; ``[]`` if none or unreadable.

    Used to name the culprit in error messages; the decision itself is ``torch.load(weights_only=True)``'s.
    """
    try:
        names = pickle_globals(_pickle_bytes(Path(path)))
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    return [n for n in dict.fromkeys(names) if not _is_allowed(n)]


def _allow(classes: tuple[type, ...]) -> contextlib.AbstractContextManager[Any]:
    """``torch.serialization.safe_globals`` (torch >= 2.5); on 2.4 the process-wide ``add_safe_globals``."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(list(classes))
    torch.serialization.add_safe_globals(list(classes))
    return contextlib.nullcontext()


def safe_torch_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with ``SAFE_GLOBALS`` allowed; ``WeightFileError`` otherwise.

    The message is one line and names the refused globals; no code from the file ever runs.
    """
    src = Path(path)
    try:
        with warnings.catch_warnings(), _allow(SAFE_GLOBALS):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the refusal below says enough
            return torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as exc:  # bad zip, refused pickle, truncated file: all "not a checkpoint we can read"
        raise WeightFileError(f"{src}: {_torch_load_problem(exc, src)}") from exc


def _resolve(path: Path) -> Path:
    """A file, or the model file inside a folder (accelerate ``save_state``, timm / Hugging Face export)."""
    if path.is_dir():
        for name in ACCELERATE_MODEL_FILES:
            if (path / name).is_file():
                return path / name
        raise WeightFileError(
            f"{path}: directory holds no model weights (expected {' or '.join(ACCELERATE_MODEL_FILES)}, "
            "as written by accelerate save_state, timm or Hugging Face)"
        )
    if not path.exists():
        raise WeightFileError(f"{path}: no such file or directory")
    if not path.is_file():
        raise WeightFileError(f"{path}: not a regular file")
    return path


@dataclass
class WeightFile:
    """What ``read_checkpoint`` found.

    ``state_dict``: name -> tensor on CPU, as stored. ``metadata``: string metadata (safetensors header, the
    ``metadata`` entry of our ``.pt`` files, or facts from an official trainer checkpoint: ``epoch``,
    ``image_size``, ``args`` as JSON). ``source``: one line saying what the file was and where the weights were.
    """

    path: Path
    state_dict: StateDict
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""


def _entries(obj: Mapping[Any, Any]) -> str:
    return ", ".join(str(k) for k in list(obj)[:8]) + (" ..." if len(obj) > 8 else "")


def _unwrap(obj: Any, path: Path, ema: bool) -> tuple[Any, str | None]:
    """``{"model": sd, ...}`` -> ``(sd, "model")``; with ``ema`` only ``EMA_KEYS`` qualify (error if none)."""
    if not isinstance(obj, Mapping):
        return obj, None
    for key in EMA_KEYS if ema else WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key], key
    if ema:
        held = f"it holds {_entries(obj)}" if not all(isinstance(v, Tensor) for v in obj.values()) else \
            "it is a plain state dict"
        raise WeightFileError(f"{path}: no EMA weights ({' or '.join(EMA_KEYS)}) in this checkpoint; {held}")
    return obj, None


def _pickle_metadata(obj: Any) -> dict[str, str]:
    """String metadata of a ``torch.save`` dict: our ``metadata`` entry, or an official trainer's epoch/args."""
    if not isinstance(obj, Mapping):
        return {}
    md: dict[str, str] = {}
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):  # the official trainer's checkpoint-N.pth
        if isinstance(getattr(args, "input_size", None), int):
            md["image_size"] = str(args.input_size)
        md["args"] = json.dumps(vars(args), default=str, sort_keys=True)
        if isinstance(obj.get("epoch"), int):
            md["epoch"] = str(obj["epoch"])
    entry = obj.get("metadata")
    if isinstance(entry, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
        md.update(entry)
    return md


def _describe_pickle(obj: Any, key: str | None) -> str:
    if isinstance(obj, Mapping) and isinstance(obj.get("args"), argparse.Namespace):
        kind = "official trainer checkpoint (args: argparse.Namespace"
        kind += f", epoch {obj['epoch']})" if isinstance(obj.get("epoch"), int) else ")"
    elif key is not None:
        kind = f"training checkpoint ({_entries(obj)})" if len(obj) > 1 else "torch.save dict"
    else:
        kind = "torch.save state dict"
    if key is not None:
        extra = [k for k in EMA_KEYS if k != key and isinstance(obj.get(k), Mapping)]
        kind += f", weights from '{key}'" + (f" (EMA weights '{extra[0]}' also present)" if extra else "")
    return kind


def _check_state_dict(obj: Any, path: Path) -> StateDict:
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if not obj:
        raise WeightFileError(f"{path}: state dict is empty")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if len(bad) == len(obj):
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise WeightFileError(f"{path}: dict holds no tensors (keys: {shown})")
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise WeightFileError(f"{path}: not a state dict: {len(bad)} entries are not named tensors ({shown})")
    return dict(obj)


def _read_safetensors(src: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        sd = load_file(str(src), device="cpu")
        with safe_open(str(src), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types; all mean "not readable"
        raise WeightFileError(f"{src}: not a readable safetensors file ({_one_line(exc)})") from exc
    return _check_state_dict(sd, src), metadata


def read_checkpoint(path: str | os.PathLike[str], ema: bool = False) -> WeightFile:
    """Read a weight file or a folder holding one -> ``Checkpoint`` (state dict on CPU, metadata, source line).

    ``ema``: take the EMA weights (``model_ema`` / ``state_dict_ema``) of a training checkpoint; an error if it
    has none. Without it the regular weights win (``model``, ``state_dict``, then ``model_ema``, ``module``).
    """
    given = Path(path)
    src = _resolve(given)
    folder = f"folder {given.name}/{src.name}: " if src != given else ""
    if src.suffix == ".safetensors" or _looks_like_safetensors(src):
        sd, metadata = _read_safetensors(src)
        if ema:
            raise WeightFileError(f"{src}: no EMA weights in a safetensors file (it holds one state dict)")
        return WeightFile(src, sd, metadata, folder + "safetensors file")
    head = _read_head(src)
    if not head:
        raise WeightFileError(f"{src}: file is empty")
    # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle starting with the PROTO opcode)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise WeightFileError(f"{src}: not a PyTorch or safetensors checkpoint (unrecognised file header)")
    obj = safe_torch_load(src)
    sd, key = _unwrap(obj, src, ema)
    return WeightFile(src, _check_state_dict(sd, src), _pickle_metadata(obj), folder + _describe_pickle(obj, key))


def load_state_dict_file(path: str | os.PathLike[str], ema: bool = False) -> tuple[StateDict, dict[str, str]]:
    """Read a weight file or checkpoint folder -> ``(state_dict, metadata)`` on CPU (see ``read_checkpoint``).

    Tensors keep their stored shapes and dtypes; ``metadata`` is the safetensors header metadata (or the
    ``metadata`` entry of a ``.pt`` written by ``save_state_dict``, or an official trainer checkpoint's ``epoch``,
    ``image_size`` and ``args``), ``{}`` when there is none. ``ema=True`` takes a training checkpoint's EMA weights.
    """
    ckpt = read_checkpoint(path, ema=ema)
    return ckpt.state_dict, ckpt.metadata


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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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


class WriteError(OSError):
    """A file or folder could not be written (full disk, permissions, a file where a folder should be); the message
    names the path the caller asked for and the cause."""


def describe_os_error(exc: BaseException, path: Path | str) -> str:
    """One line naming the path and the cause; recognises a full disk behind torch's and safetensors' errors."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code is None and ("unexpected pos" in text or "No space left" in text):  # torch's zip writer, safetensors
        code = errno.ENOSPC
    cause = {errno.ENOSPC: "no space left on the disk", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded",
             errno.ENOTDIR: "a file stands where a folder should be",
             errno.EEXIST: "a file stands where a folder should be"}.get(code or -1)
    return f"cannot write {path}: {cause or (text.splitlines()[0] if text else type(exc).__name__)}"


def temp_name(path: Path) -> str:
    """The prefix of every temp file or folder written beside ``path`` (``.NAME.<random>.tmp``): one naming rule,
    so that what a killed writer left can be recognised and removed."""
    return f".{path.name}."


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """The one atomic file writer: ``write(tmp)`` fills a temp file beside ``path``, which is then fsynced and renamed
    over ``path`` (readers see the old file or the whole new one). Permissions are a plain ``open()``'s. On any
    error the temp file is removed, ``path`` is untouched and a ``WriteError`` names ``path`` and the cause."""
    dst = Path(path)
    tmp: Path | None = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=temp_name(dst), suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        # mkstemp makes the file private (0600), and safetensors >= 0.8 recreates it so
        os.chmod(tmp, 0o666 & ~_umask())
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except Exception as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise WriteError(describe_os_error(exc, dst)) from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    return dst


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` to ``path`` atomically (``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def strict_json_value(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by ``None`` (mappings, lists and tuples walked), so that it can be
    written as strict JSON: Python's ``json`` writes ``NaN``/``Infinity`` otherwise, which other JSON readers
    (``jq``, JavaScript, Go) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj``: non-finite floats become ``null``, unknown objects their ``str``."""
    return json.dumps(strict_json_value(obj), indent=indent, default=str, allow_nan=False)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``obj`` as indented strict JSON (``strict_json``: NaN/inf as ``null``) to ``path`` atomically."""
    return write_text_atomic(path, strict_json(obj, indent=2) + "\n")


def file_crc32(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """CRC-32 of a file's content as 8 hex digits, read in 1 MiB chunks (constant memory for any file size)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def save_state_dict(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` atomically: safetensors, or ``{"model": sd, "metadata": md}`` for ``.pt``/``.pth``.

    Metadata values are stored as strings. Returns the path written; a failure is a ``WriteError``.
    """
    dst = Path(path)
    md = {str(k): str(v) for k, v in (metadata or {}).items()}
    sd = _prepare(state_dict)

    def write(tmp: Path) -> None:
        if dst.suffix in TORCH_SUFFIXES:
            torch.save({"model": sd, "metadata": md}, tmp)
        else:
            save_file(sd, str(tmp), metadata=md)

    return atomic_write(dst, write)


def save_folder(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create or update folder ``path`` atomically: ``write(tmp)`` fills a temp folder beside it, then it moves in.

    A missing or empty ``path`` is replaced by the temp folder in one rename (readers see no folder or the whole
    new one). Into an existing non-empty folder each new file is moved with ``os.replace`` (each file atomic,
    ``config.json`` last, other files kept). On any error the temp folder is removed and ``path`` is untouched.
    """
    dst = Path(path)
    if dst.exists() and not dst.is_dir():
        raise WeightFileError(f"{dst}: exists and is not a folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=temp_name(dst), suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        write(tmp)
        files = sorted(tmp.iterdir(), key=lambda f: (f.name == "config.json", f.name))
        for f in files:
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if dst.is_dir() and any(dst.iterdir()):
            for f in files:
                os.replace(f, dst / f.name)
            tmp.rmdir()
        else:
            if dst.is_dir():
                dst.rmdir()  # empty: renaming onto it is not portable
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dst.parent)
    return dst
