"""Stopping on a signal: SIGTERM, SIGINT and SIGUSR1 finish the current optimizer step, save a checkpoint and exit.

Cluster schedulers end a job with SIGTERM (Slurm, Kubernetes) or a warning signal some time before the kill
(Slurm ``--signal=USR1@120``); a terminal sends SIGINT. ``StopRequest`` turns the first of them into a flag the
trainer reads at step boundaries (never in the middle of a step: the checkpoint is the normal one, at a step
boundary, so the resumed run continues bit-for-bit). The exit status is ``128 + 2`` for SIGINT (130, as a shell
reports Ctrl-C) and 143 (``128 + 15``, "terminated") for SIGTERM and SIGUSR1, so a job script can tell a clean stop
from a crash.

Signal storms. A scheduler signals every process of a job, and a launcher (``torchrun``, ``accelerate launch``:
torch's elastic agent) forwards the signal it got to its workers once more: each rank sees the same stop twice,
milliseconds apart, and then the agent waits its shutdown timeout before SIGKILL. So repeated SIGTERM/SIGUSR1 never
abort a stop (only SIGKILL can); a second SIGINT aborts at once only when it comes later than ``ECHO_S`` after the
first (a user pressing Ctrl-C twice), not when a launcher echoes the terminal's Ctrl-C. The abort raises
``RunInterrupted(aborted=True)`` from the handler: checkpoints are complete-or-invisible, so whatever the save was
doing is cleaned up or ignored at the next start.

Errors that end a run with an exit status of their own (a non-finite loss, a lost peer, a hang) are
``FatalRunError``s: one line on stderr, their ``exit_status`` (``fcmae.commands._common.run_guarded``).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# a second SIGINT later than this after the first is a user's second Ctrl-C (abort); sooner, a launcher's echo
ECHO_S = 1.0
# exit statuses of the runs that end on an error of their own (1: other user errors, 2: usage/config errors)
EXIT_NONFINITE, EXIT_HANG, EXIT_PEER_LOST = 3, 4, 5


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


class FatalRunError(RuntimeError):
    """A run that cannot go on, with an exit status of its own and a message of one line."""

    exit_status = 1


class StopRequest:
    """Handlers for ``STOP_SIGNALS`` while a run trains: the first signal is remembered (``signum``, ``time``);
    repeats are counted (``repeats``) and ignored, except a user's second Ctrl-C (a SIGINT later than ``ECHO_S``
    after the first), which raises ``RunInterrupted(aborted=True)``. ``install``/``restore`` put back the previous
    handlers (installed only from the main thread: Python delivers signals there alone)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.time = 0.0
        self.repeats = 0
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
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.time = signum, now
            return
        if signum != signal.SIGINT or now - self.time <= ECHO_S:
            self.repeats += 1  # the launcher's forward of the same stop, or the scheduler again: the save goes on
            return
        self.restore()  # a third Ctrl-C gets the default action
        raise RunInterrupted(signum, None, None, aborted=True)
