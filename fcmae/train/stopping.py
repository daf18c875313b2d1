"""Stopping on a signal: SIGTERM, SIGINT and SIGUSR1 finish the current optimizer step, save a checkpoint and exit.

Cluster schedulers end a job with SIGTERM (SLURM, Kubernetes) or a warning signal some time before the kill
(SLURM ``--signal=USR1@120``); a terminal sends SIGINT. ``StopRequest`` turns the first of them into a flag the
trainer reads at step boundaries (never in the middle of a step: the checkpoint is the normal one, at a step
boundary, so the resumed run continues bit-for-bit). A second signal aborts at once by raising ``RunInterrupted``
from the handler: checkpoints are complete-or-invisible, so whatever the save was doing is cleaned up or ignored at
the next start. The exit status is ``128 + 2`` for SIGINT (130, as a shell reports Ctrl-C) and 143 (``128 + 15``,
"terminated") for SIGTERM and SIGUSR1, so a job script can tell a clean stop from a crash.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class RunInterrupted(BaseException):
    """The run stopped on a signal. A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except
    Exception`` on the way out (a logger, a reader) swallows it. ``checkpoint``: the newest complete checkpoint;
    ``aborted``: a second signal cut the stop short."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int | None, aborted: bool = False) -> None:
        super().__init__(signum, checkpoint, step, aborted)
        self.signum, self.checkpoint, self.step, self.aborted = signum, checkpoint, step, aborted

    @property
    def exit_status(self) -> int:
        return 130 if self.signum == signal.SIGINT else 143

    def __str__(self) -> str:
        name = signal_name(self.signum)
        where = f"checkpoint {self.checkpoint}" if self.checkpoint else "no checkpoint yet"
        if self.aborted:
            return (f"aborted by a second {name} while stopping (nothing half-written is ever resumed from); last "
                    f"complete {where}; continue with run.resume=auto")
        return f"stopped by {name} after step {self.step}: {where}; continue with run.resume=auto"


class StopRequest:
    """Handlers for ``STOP_SIGNALS`` while a run trains: the first signal is remembered (``signum``, ``time``),
    the second raises ``RunInterrupted(aborted=True)``. ``install``/``restore`` put back the previous handlers
    (installed only from the main thread: Python delivers signals there alone)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.time = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous[sig] = signal.SIG_DFL if previous is None else previous

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self.time = signum, time.monotonic()
            return
        self.restore()  # a third signal gets the default action
        raise RunInterrupted(signum, None, None, aborted=True)
