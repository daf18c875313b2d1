"""The run folder: one run at a time (an OS lock), the output-folder guard (one run's outputs are never overwritten
by accident), the config of every segment, and the decision what a start does (resume which checkpoint, or nothing
because the run is finished, or refuse a resume whose config changes what is trained).

Everything here that can refuse a start only reads: a refused start leaves the folder byte-identical.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcmae.config import ConfigError, config_yaml, to_dict, training_changes
from fcmae.train.preflight import RUN_MARKERS, output_dir_problem  # (RUN_MARKERS: the files that mean a run)
from fcmae.weights.checkpoints import checkpoint_problem, cleanup_partial, scan_checkpoints
from fcmae.weights.files import WriteError, describe_os_error, strict_json, temp_name, write_text_atomic

LOCK_NAME = ".fcmae.lock"
HISTORY = "config_history.jsonl"  # the config of every segment after the first (config.yaml), one JSON a line
# the run's own outputs written with the atomic writer: their leftover temp files are removed at start
OUTPUT_FILES = (*RUN_MARKERS, HISTORY)


class RunDirError(WriteError):
    """The output folder cannot be used (another run's outputs, a file in its place, a live run in it) or written."""


class ConfigChangeError(ConfigError):
    """``run.resume=auto`` with a config that changes what is trained (exit status 2, like any config error)."""


# --------------------------------------------------------------------------------------------- the lock
# lock descriptors this process holds. A forked child (a DataLoader worker, a compile worker) closes its copies at
# once: a flock belongs to the open file, and a child outliving a SIGKILLed trainer would otherwise hold the run's
# lock until it noticed (seconds), refusing an elastic restart. Exec'd children never get it (os.open's
# descriptors are close-on-exec). Closing, never unlocking: LOCK_UN from the child would free the parent's lock.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``<output_dir>/.fcmae.lock``, held for the whole run.

    The kernel drops a ``flock`` when its process ends, however it ends (SIGKILL, OOM killer, node reboot of a
    local disk), and no child keeps it (``_close_inherited_locks``), so a lock left by a dead run never blocks the
    next one, not even an elastic restart 0.1 s later: no stale-lock heuristics. The file holds
    the holder's pid, host and start time while the lock is held (for the message a second run prints) and is
    emptied on release, so a folder's bytes do not depend on who last looked at it.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise ``RunDirError`` naming the holder. Returns a warning when the file system has
        no ``flock`` (some network file systems): the run goes on unprotected rather than not at all."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise RunDirError(f"run.output_dir {self.out_dir} is a file, not a folder")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunDirError(describe_os_error(exc, self.out_dir)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                return f"cannot lock {self.path} ({exc.strerror}): a second run into this folder is not prevented"
            holder = _describe_holder(_holder_bytes(fd))
            os.close(fd)
            raise RunDirError(f"run.output_dir {self.out_dir} is in use by another run ({holder}); wait for it to "
                              "end or choose another run.output_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        _HELD.add(fd)
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass  # a full or read-only disk must not turn a clean end into an error: the lock goes anyway
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        _HELD.discard(self.fd)
        os.close(self.fd)
        self.fd = None


def _holder_bytes(fd: int, wait_s: float = 1.0) -> bytes:
    """The lock file's content as its holder wrote it. Between a holder's ``flock`` and its write, the file still
    names the previous holder (a SIGKILLed run leaves its name), so a name of a process that is gone from this host
    is read again until the new one appears (at most ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    raw = os.pread(fd, 4096, 0)
    while not _alive_here(raw) and time.monotonic() < deadline:
        time.sleep(0.02)
        raw = os.pread(fd, 4096, 0)
    return raw


def _alive_here(raw: bytes) -> bool:
    """False when ``raw`` names no process, or one on this host that no longer exists; True otherwise (a process
    on another host cannot be checked from here)."""
    try:
        info = json.loads(raw.decode())
        pid, host = int(info["pid"]), info["host"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe_holder(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that is just starting"  # it holds the lock but has not written its name yet


# --------------------------------------------------------------------------------------------- the guard
def prepare_output_dir(out_dir: Path, resume: str, overwrite: bool) -> None:
    """Refuse to start a new run over another run's outputs unless told to (``run.resume`` / ``run.overwrite``);
    with ``overwrite`` the old run's outputs are removed first. Checks the folder can be written."""
    if problem := output_dir_problem(out_dir, resume, overwrite):
        raise RunDirError(problem)
    used = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if used and overwrite:
            for m in (*used, HISTORY):
                target = out_dir / m
                if target.exists():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
        probe = out_dir / ".fcmae_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(describe_os_error(exc, out_dir)) from None


def remove_stale_temps(out_dir: Path) -> list[str]:
    """Remove the temp files (and folders) an interrupted atomic write of the run's own outputs left beside them
    (``.NAME.<random>.tmp``, ``fcmae.weights.files.temp_name``). Safe because the lock says no writer is alive."""
    prefixes = tuple(temp_name(Path(name)) for name in OUTPUT_FILES)
    done = []
    for p in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if p.name.startswith(prefixes) and p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            done.append(f"removed {p.name} (left by an interrupted write)")
    return done


# --------------------------------------------------------------------------------------------- segments
def saved_config(out_dir: Path) -> tuple[dict[str, Any], str] | None:
    """The config the run in ``out_dir`` last trained with, and where it was read: the last line of
    ``config_history.jsonl``, else ``config.yaml`` (the first segment's); None when neither exists."""
    import yaml

    hist = out_dir / HISTORY
    if hist.is_file():
        lines = [x for x in hist.read_text().splitlines() if x.strip()]
        for line in reversed(lines):
            try:
                return json.loads(line)["config"], HISTORY
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash: the one before holds
    if (out_dir / "config.yaml").is_file():
        try:
            return yaml.safe_load((out_dir / "config.yaml").read_text()) or {}, "config.yaml"
        except yaml.YAMLError as exc:
            raise ConfigError(f"{out_dir / 'config.yaml'}: cannot read the run's config ({exc})") from None
    return None


def check_config_change(out_dir: Path, cfg: Any) -> list[tuple[str, Any, Any]]:
    """The training keys (``fcmae.config.training_changes``) ``cfg`` changes against the run's saved config.
    Raises ``ConfigChangeError`` listing each with its old and new value unless ``run.allow_config_change``."""
    saved = saved_config(out_dir)
    if saved is None:
        return []
    changes = training_changes(saved[0], to_dict(cfg))
    if changes and not cfg.run.allow_config_change:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
        raise ConfigChangeError(f"run.resume=auto: this config changes what the run in {out_dir} was trained with "
                                f"({saved[1]}): {listed}; resume with the old values, or with "
                                "run.allow_config_change=true to continue anyway, or choose another run.output_dir")
    return changes


def record_segment(out_dir: Path, cfg: Any, resumed_from: Path | None, step: int,
                   changes: list[tuple[str, Any, Any]], note: str = "") -> None:
    """``config.yaml`` holds the first segment's config (``note``, e.g. the lr used, as a comment on top) and is never
    rewritten by a resume; each resumed segment appends its config (and what it changed, old and new) to
    ``config_history.jsonl``."""
    first = out_dir / "config.yaml"
    if resumed_from is None or not first.is_file():
        write_text_atomic(first, (f"# {note}\n" if note else "") + config_yaml(cfg))
        return
    previous = saved_config(out_dir)
    hist = out_dir / HISTORY
    old = hist.read_text() if hist.is_file() else ""
    entry: dict[str, Any] = {
        "segment": 2 + sum(1 for x in old.splitlines() if x.strip()), "resumed_from": str(resumed_from),
        "step": step, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": to_dict(cfg),
        "changed": {k: {"old": a, "new": b} for k, a, b in changes}}
    if changes and previous is not None:
        entry["previous_config"] = previous[0]
    write_text_atomic(hist, old + strict_json(entry) + "\n")


# --------------------------------------------------------------------------------------------- the start
@dataclass
class RunStart:
    """What a start does: resume ``resume_from`` (None: from scratch), or nothing (``finished``: the summary of a
    run that already reached its last step). ``notes``: lines to print; ``changes``: accepted config changes."""

    resume_from: Path | None = None
    finished: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)


def _newest_good(ckpt_root: Path, notes: list[str]) -> Path | None:
    good, bad = scan_checkpoints(ckpt_root, content=True)
    notes.extend(f"skipping checkpoint {p}: {why}" for p, why in bad)
    return good[-1] if good else None


def finished_summary(out_dir: Path, last_step: int) -> dict[str, Any] | None:
    """The ``summary.json`` of a run that reached ``last_step`` (None otherwise). A checkpoint at the last step
    without a summary means the end itself (exports, summary) was interrupted: that run is resumed, which redoes
    only the end."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        return summary if int(summary["steps"]) >= last_step else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def open_run(out_dir: Path, ckpt_root: Path, cfg: Any, last_step: int) -> RunStart:
    """Decide what this start does (main process, with the lock held). Every refusal comes before the first write;
    then partial checkpoints and stale temp files are cleaned up."""
    run, start = cfg.run, RunStart()
    prepare_output_dir(out_dir, run.resume, run.overwrite)
    if run.resume == "auto":
        start.resume_from = _newest_good(ckpt_root, start.notes)
        if start.resume_from is not None:  # without a checkpoint the run starts over: any config is fine
            start.changes = check_config_change(out_dir, cfg)
        else:
            start.notes.append(f"run.resume=auto: no complete checkpoint in {ckpt_root}; starting fresh")
        start.finished = finished_summary(out_dir, last_step)
        if start.finished is not None:
            return start
    elif run.resume:
        p = Path(run.resume)
        if not p.is_dir():
            raise RunDirError(f"run.resume: checkpoint directory not found: {p}")
        if why := checkpoint_problem(p, content=True):
            raise RunDirError(f"run.resume: {p} is not a complete checkpoint: {why}")
        start.resume_from = p
    cleaned = cleanup_partial(ckpt_root)
    start.notes += cleaned + remove_stale_temps(out_dir)
    if run.resume == "auto" and any(x.startswith("restored") for x in cleaned):
        start.resume_from = _newest_good(ckpt_root, [])  # a checkpoint whose replacement was interrupted is back
    return start
