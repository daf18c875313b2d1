"""Training checkpoints on disk: complete-or-invisible ``checkpoints/step_N`` folders, found and verified.

A checkpoint ``checkpoints/step_N`` is accelerate's ``save_state`` written into ``.tmp_step_N``, completed by a
``MANIFEST.json`` (every file with its size, written last, everything fsynced) and then renamed in. An existing
``step_N`` is renamed aside before its replacement comes in and deleted only afterwards, so a crash at any moment
leaves at least one complete checkpoint; ``cleanup_partial`` undoes what such a crash left. ``resume=auto`` takes the
newest checkpoint whose manifest checks out and reports the ones it skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from fcmae.weights.files import WriteError, describe_os_error, write_json_atomic

CKPT_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "MANIFEST.json"


def fsync_tree(root: Path) -> None:
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------- checkpoints
def checkpoint_problem(ckpt: Path) -> str | None:
    """``None`` when ``ckpt`` is a complete checkpoint, else why not (missing manifest, missing or short file)."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete or written by an interrupted save)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, expected {size}"
    return None


def scan_checkpoints(root: Path | str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(complete checkpoints oldest first, [(incomplete checkpoint, why)])`` under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    found = sorted((int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name)))
    good, bad = [], []
    for _, p in found:
        why = checkpoint_problem(p)
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
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    fsync_tree(tmp)
    write_json_atomic(tmp / MANIFEST, {"step": step, "files": files})


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
