"""What a job on several processes meets on a cluster, handed to the trainer as one component (``Faults``).

- **The stop step.** The processes of a job agree on the step they stop at (``StopAgreement``): every step each
  votes its stop flag in an all-reduce on a small gloo group of its own, awaited one step later, so no device value
  is read and no step waits for it; all see the same result at the same step and stop there together.
- **Bounded waiting.** ``run.dist_timeout_s`` bounds the process group's set-up and every collective (accelerate's
  ``InitProcessGroupKwargs``; the control group takes the same). A lost peer (a killed rank, a dead node) ends the
  survivors with one line naming the rank that was lost and the step (``PeerLostError``, exit 5), not a backend
  traceback.
- **Hangs.** ``HangWatchdog``: no step completed for ``run.hang_timeout_s`` (by default 50 x the median step time,
  at least 5 minutes): every process writes all its threads' Python stacks to ``RUN_DIR/hang-<rank>.txt``, says
  so in one line naming the rank and the last step, and exits with status 4, so that the launcher's elastic agent
  or the scheduler can restart the job (``run.resume=auto`` continues from the newest complete checkpoint).
"""

from __future__ import annotations

import faulthandler
import os
import re
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from fcmae.train.stopping import EXIT_HANG, EXIT_PEER_LOST, FatalRunError, StopRequest


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the job's size, as the launcher set them (1 process: ``(0, 1)``)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def process_group_kwargs(timeout_s: float) -> Any:
    """accelerate's handler for the process group: set-up and collectives bounded by ``timeout_s`` (instead of
    torch's default of 30 minutes, 10 for NCCL), and under an elastic agent the rendezvous of ``attempt_store``."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s), init_method=elastic_init_method())


ELASTIC_SCHEME = "fcmae-attempt"


def elastic_init_method() -> str | None:
    """``fcmae-attempt://`` when the launcher's elastic agent serves the store (``torchrun``, ``accelerate launch``:
    ``TORCHELASTIC_USE_AGENT_STORE=True``), else None (torch's ``env://``).

    Why: the agent keeps one store for the whole job, across restarts (static rendezvous, and c10d's shared store
    in torch 2.14), and torch's ``env://`` uses it without a per-attempt prefix. A restarted group then finds the
    dead generation's keys (gloo's peer addresses, barrier counters) and, racing its own writes, dials dead ports
    (``connectFullMesh failed ... Connection refused``) or waits on a peer that never comes: the failures seen after
    a rank-0 death. This rendezvous is ``env://`` with the attempt's own key prefix."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    import importlib

    try:  # the module, not torch.distributed's function of the same name
        importlib.import_module("torch.distributed.rendezvous").register_rendezvous_handler(ELASTIC_SCHEME,
                                                                                            _attempt_rendezvous)
    except RuntimeError:
        pass  # registered by an earlier trainer in this process
    return f"{ELASTIC_SCHEME}://"


def _attempt_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs: Any) -> Iterator[Any]:
    """Rendezvous handler (a generator of ``(store, rank, world_size)``): the agent's store as a client, its keys
    under ``fcmae/attempt_<TORCHELASTIC_RESTART_COUNT>/``."""
    import torch.distributed as dist

    e = os.environ
    rank, world = int(e["RANK"]), int(e["WORLD_SIZE"])
    agent = dist.TCPStore(e["MASTER_ADDR"], int(e["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"fcmae/attempt_{e.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
    yield store, rank, world
    raise RuntimeError("the fcmae-attempt rendezvous cannot be repeated")


# ------------------------------------------------------------------------------------------- the stop step
class StopAgreement:
    """The step at which every process stops on a signal (``poll``), whichever process got it.

    One process: its own flag, at once. Several: at every step a process votes its flag (``max`` of the signal
    numbers) in an asynchronous all-reduce of one CPU integer on a gloo group of its own (not the gradients' group,
    so it never queues behind them, and on GPUs no device value is read), and reads the previous step's result: a
    stop seen by any process before step ``k`` ends every process at step ``k + 1``. The processes call ``poll``
    at the same steps (the loop is the same on all); a second call at the same step answers from memory.
    """

    def __init__(self, stop: StopRequest, timeout_s: float) -> None:
        import torch.distributed as dist

        self.stop = stop
        self.step = -1
        self.agreed = 0  # the agreed signal number (0: go on)
        self.group = None
        self._vote = torch.zeros(1, dtype=torch.int64)
        self._work: Any = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def poll(self, step: int) -> int:
        """The agreed stop signal at ``step`` (0: no stop)."""
        if self.group is None:  # one process: its own flag, now
            self.agreed = self.stop.signum or 0
            return self.agreed
        if step == self.step:
            return self.agreed
        self.step = step
        import torch.distributed as dist

        if self._work is not None:
            self._work.wait()
            self._work = None
            self.agreed = int(self._vote[0])
        if not self.agreed:
            self._vote = torch.tensor([self.stop.signum or 0], dtype=torch.int64)
            self._work = dist.all_reduce(self._vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return self.agreed

    def close(self) -> None:
        """At the end of the loop (every process): the last vote is awaited, so no collective is left pending."""
        if self._work is not None:
            self._work.wait()
            self._work = None


# ------------------------------------------------------------------------------------------- lost peers
class PeerLostError(FatalRunError):
    """Another process of the job is gone (or did not answer within ``run.dist_timeout_s``): this one cannot go on.
    Reported by every process (rank 0 may be the one lost)."""

    exit_status = EXIT_PEER_LOST
    every_rank = True


# what torch's gloo and NCCL backends and its stores say when a peer dies or stops answering
_PEER_TEXT = re.compile(r"connection (reset|closed|refused)|broken pipe|timed out|timeout|socket|peer|nccl|gloo"
                        r"|connectfullmesh|recv|send", re.IGNORECASE)


def _reason(exc: BaseException) -> str:
    """The backend's first sentence without its source location (``[.../pair.cc:534] Connection closed by peer``)."""
    line = next((x for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
    line = re.sub(r"\[[^\]]*\.(cc|cpp|hpp|h):\d+\]\s*", "", line).strip()
    return re.split(r"\.\s+(?=[A-Z])", line)[0]  # gloo goes on with advice ("This is typically caused by ...")


def peer_failure(exc: BaseException, step: int, timeout_s: float, newest: Path | None) -> PeerLostError | None:
    """``exc`` as a ``PeerLostError`` when it is a collective or store failing in a job of several processes
    (torch raises them as ``RuntimeError``s: ``DistBackendError``, ``DistNetworkError``, gloo's own); else None."""
    rank, world = rank_and_world()
    if world < 2 or not isinstance(exc, RuntimeError) or isinstance(exc, FatalRunError):
        return None
    dist_error = getattr(torch.distributed, "DistError", ())
    if not (isinstance(exc, dist_error) or _PEER_TEXT.search(str(exc))):
        return None
    reason = _reason(exc)
    who = f"rank {1 - rank}" if world == 2 else "a peer"
    if re.search(r"timed out|timeout", reason, re.IGNORECASE):
        what = f"{who} did not answer within run.dist_timeout_s={timeout_s:g} s at step {step} ({reason})"
    else:
        what = f"{who} lost at step {step}: {reason}"
    return PeerLostError(f"rank {rank}: {what}; newest complete checkpoint: {newest or 'none'}; a restart with "
                         "run.resume=auto continues from it")


# ------------------------------------------------------------------------------------------- hangs
class HangWatchdog:
    """A thread that ends the process when no step completes for too long (a frozen peer, a dead mount).

    ``beat(step)`` after every optimizer step arms it (nothing before the first step: the set-up's waits are bounded
    by ``run.dist_timeout_s``); ``paused()`` around work that is not steps (evaluation, exports). The limit is
    ``timeout_s`` when given (> 0), else ``max(FLOOR_S, FACTOR x median of the last 100 step times)``. Firing: all
    threads' stacks (``faulthandler``) to ``<out_dir>/hang-<rank>.txt``, one line on stderr, ``os._exit(4)``: the
    main thread is stuck in a wait no exception reaches, so the process is ended from here.
    """

    FLOOR_S, FACTOR = 300.0, 50.0

    def __init__(self, out_dir: Path, timeout_s: float | None, label: str = "fcmae") -> None:
        self.out_dir, self.timeout_s, self.label = Path(out_dir), timeout_s, label
        self.rank = rank_and_world()[0]
        self.step: int | None = None
        self.last: float | None = None  # monotonic time of the last beat (None: not armed)
        self.times: deque[float] = deque(maxlen=100)
        self._paused = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HangWatchdog:
        self._thread = threading.Thread(target=self._watch, name="fcmae-hang-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def beat(self, step: int) -> None:
        now = time.monotonic()
        if self.last is not None and self.step is not None and step == self.step + 1:
            self.times.append(now - self.last)
        self.step, self.last = step, now

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self.last is not None:
                self.last = time.monotonic()  # the wait for the next step starts now

    def limit(self) -> float:
        if self.timeout_s:
            return float(self.timeout_s)
        median = statistics.median(self.times) if self.times else 0.0
        return max(self.FLOOR_S, self.FACTOR * median)

    def overdue(self) -> bool:
        return self.last is not None and not self._paused and time.monotonic() - self.last > self.limit()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.limit() / 10)):
            if self.overdue():
                self.fire()

    def fire(self) -> None:
        """Write the stacks, say it in one line, end the process with status 4 (never returns)."""
        waited = time.monotonic() - (self.last or time.monotonic())
        path = self.out_dir / f"hang-{self.rank}.txt"
        try:
            with open(path, "w") as f:
                f.write(f"rank {self.rank} pid {os.getpid()}: no step completed for {waited:.0f} s after step "
                        f"{self.step} (limit {self.limit():g} s); Python stacks of every thread:\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            where = f"stacks in {path}"
        except OSError as exc:
            where = f"could not write {path} ({exc.strerror})"
        print(f"{self.label}: rank {self.rank} hung: no step completed for {waited:.0f} s after step {self.step} "
              f"(limit {self.limit():g} s, run.hang_timeout_s); {where}; exiting with status {EXIT_HANG} so that "
              "the launcher or the scheduler can restart the job (run.resume=auto)", file=sys.stderr, flush=True)
        os._exit(EXIT_HANG)


class Faults:
    """The trainer's fault handling in one piece: the stop agreement, the watchdog and the lost-peer translation.
    Made once the process group exists (``Trainer._setup``), closed in ``Trainer.fit``'s ``finally``."""

    def __init__(self, stop: StopRequest, out_dir: Path, run: Any, label: str) -> None:
        self.timeout_s = float(run.dist_timeout_s)
        self.agreement = StopAgreement(stop, self.timeout_s)
        self.watchdog = HangWatchdog(out_dir, run.hang_timeout_s, label).start()

    def translate(self, exc: BaseException, step: int, newest: Path | None) -> BaseException | None:
        """What ``exc`` (raised through the loop) means: a hang this process was already in (the watchdog fires
        here, with the stacks), a lost peer (``PeerLostError``), or nothing of ours (None: re-raise as is)."""
        lost = peer_failure(exc, step, self.timeout_s, newest)
        if lost is not None and self.watchdog.overdue():
            self.watchdog.fire()  # e.g. a rank woken after a SIGSTOP whose peers gave up: the hang is the news
        return lost

    def close(self, clean: bool) -> None:
        self.watchdog.stop()
        if clean:
            self.agreement.close()
