"""Training checkpoints on disk: complete-or-invisible ``checkpoints/step_N`` folders, found and verified.

A checkpoint ``checkpoints/step_N`` is accelerate's ``save_state`` written into ``.tmp_step_N``, completed by a
``MANIFEST.json`` (every file with its size and CRC-32, written last, everything fsynced) and then renamed in. An
existing ``step_N`` is renamed aside before its replacement comes in and deleted only afterwards, so a crash at any
moment leaves at least one complete checkpoint; ``cleanup_partial`` undoes what such a crash left. ``resume=auto``
takes the newest checkpoint whose manifest checks out, sizes and checksums, and reports the ones it skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from fcmae.weights.files import WriteError, describe_os_error, file_crc32, write_json_atomic

CKPT_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "MANIFEST.json"


def fsync_tree(root: Path) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------- checkpoints
OK, INCOMPLETE, CORRUPT = "ok", "incomplete", "corrupt"


def _read_manifest(ckpt: Path) -> tuple[dict[str, int], dict[str, str]] | str:
    """``(sizes, crc32s)`` from the manifest (no ``crc32`` in a manifest older than checksums: ``{}``), else why
    not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files, crcs = manifest["files"], manifest.get("crc32", {})
        if not isinstance(files, dict) or not isinstance(crcs, dict):
            raise TypeError
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete or written by an interrupted save)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    return files, crcs


def checkpoint_status(ckpt: Path, content: bool = True) -> tuple[str, str | None]:
    """``(state, why)``: ``("ok", None)``, ``("incomplete", why)`` (no manifest, a missing or short file: what an
    interrupted save leaves) or ``("corrupt", why)`` (an unreadable manifest, a file whose content does not match
    its recorded CRC-32). ``content=False`` checks sizes only (cheap: no file is read); a manifest written before
    checksums were recorded is checked by sizes either way."""
    read = _read_manifest(ckpt)
    if isinstance(read, str):
        return (CORRUPT if read.startswith("unreadable") else INCOMPLETE), read
    files, crcs = read
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file():
            return INCOMPLETE, f"missing {name}"
        if f.stat().st_size != size:
            return INCOMPLETE, f"{name} has {f.stat().st_size} bytes, expected {size}"
    if content:
        for name, want in crcs.items():
            if (got := file_crc32(ckpt / name)) != want:
                return CORRUPT, f"{name} does not match its checksum (crc32 {got}, recorded {want}): corrupt"
    return OK, None


def checkpoint_problem(ckpt: Path, content: bool = False) -> str | None:
    """``None`` when ``ckpt`` is a complete checkpoint (``content=True``: and every file matches its checksum),
    else why not."""
    return checkpoint_status(ckpt, content)[1]


def list_checkpoints(root: Path | str) -> list[Path]:
    """Every ``root/step_N`` folder, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted((int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name)))
    return [p for _, p in found]


def scan_checkpoints(root: Path | str, content: bool = False) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(complete checkpoints oldest first, [(incomplete or corrupt checkpoint, why)])`` under ``root``.

    ``content=True`` also verifies every file's checksum (reads every checkpoint whole: what ``resume=auto`` and
    ``fcmae verify`` do); the default checks sizes only (the pruning after every save)."""
    good, bad = [], []
    for p in list_checkpoints(root):
        why = checkpoint_problem(p, content)
        (bad.append((p, why)) if why else good.append(p))
    return good, bad


def find_latest_checkpoint(root: Path | str) -> Path | None:
    """Newest complete checkpoint directory ``root/step_N`` (temp and incomplete ones are never picked)."""
    good, _ = scan_checkpoints(root)
    return good[-1] if good else None


def cleanup_partial(root: Path | str) -> list[str]:
    """Remove temp dirs left by an interrupted save and restore a checkpoint renamed aside whose replacement never
    arrived. Returns what was done, one line each."""
    root = Path(root)
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        if p.name.startswith(".tmp_step_"):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed the partial checkpoint {p.name}")
        elif p.name.startswith(".old_step_"):
            final = root / p.name[len(".old_"):]
            if final.is_dir() and checkpoint_problem(final) is None:
                shutil.rmtree(p, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(p, final)
                done.append(f"restored {final.name} (its replacement was interrupted)")
    return done


def _write_manifest(tmp: Path, step: int) -> None:
    """Every file's size and CRC-32 (read back once after accelerate wrote it: the bytes on disk are what is
    checked later), everything fsynced, the manifest last."""
    names = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in names}
    crcs = {str(f.relative_to(tmp)): file_crc32(f) for f in names}
    fsync_tree(tmp)
    write_json_atomic(tmp / MANIFEST, {"step": step, "files": files, "crc32": crcs})


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is renamed aside first and deleted last."""
    old = final.with_name(f".old_{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, root: Path, step: int, keep_last: int) -> Path:
    """accelerate ``save_state`` into a temp dir, manifest, atomic rename to ``root/step_N``; prune the oldest
    complete checkpoints beyond ``keep_last``. A write error removes the temp dir and raises ``WriteError``."""
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(describe_os_error(exc, root)) from None
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_manifest(tmp, step)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(describe_os_error(exc, tmp.with_name(final.name))) from None
    if accelerator.is_main_process:
        _swap_in(tmp, final)
        good, _ = scan_checkpoints(root)
        for p in good[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
