"""Seeded sampling: a per-epoch order and per-sample augmentation (and mask) that depend only on the seeds.

Every sample's augmentation and mask are drawn from generators seeded by ``(seed, epoch, index)``, and the
per-epoch order comes from a sampler seeded by ``(seed, epoch)``. So the data a step sees does not depend on the
number of processes, DataLoader workers, or whether the run was resumed; together with accelerate's
model/optimiser/RNG state this makes a resumed run equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from fcmae.data.images import BadImageError
from fcmae.data.policy import BAD_IMAGE, skip_vector
from fcmae.data.protocol import Items, SampleBase
from fcmae.models.masking import MASK_RATIO, random_masking

# the generator of the sample being produced (set by SeededSamples around base[...]); DataLoader workers are
# processes, so one per process suffices. None outside a seeded item: transforms then use a fresh generator.
_CURRENT: np.random.Generator | None = None


def sample_generator() -> np.random.Generator:
    """The random generator a transform draws its parameters from: the current sample's, seeded by ``(seed,
    epoch, index)``, when called inside ``SeededSamples``; else an unseeded one. Cheap (no global seeding)."""
    return _CURRENT if _CURRENT is not None else np.random.default_rng()


@contextlib.contextmanager
def seeded(s: int, seed_globals: bool = False) -> Iterator[None]:
    """Within: ``sample_generator()`` is a NumPy generator seeded with ``s``; with ``seed_globals`` also Python's,
    NumPy's and torch's CPU generators are seeded from ``s`` and restored afterwards (for third-party transforms
    that draw from them; torch's CPU generator only: ``torch.manual_seed`` would also queue a CUDA seed, ~0.6 ms
    per call in a DataLoader worker of a CUDA build)."""
    global _CURRENT
    _CURRENT = np.random.default_rng(s)
    saved = (random.getstate(), np.random.get_state(), torch.default_generator.get_state()) if seed_globals else None
    try:
        if saved is not None:
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            torch.default_generator.manual_seed(s)
        yield
    finally:
        _CURRENT = None
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


class Sample(NamedTuple):
    """One training item; batched by the DataLoader into the same type with a leading batch axis.

    ``image``: ``(C, H, W)``; ``target``: the mask ``(h*w,)`` bool (pretraining, True = removed) or the label
    (``-1`` for unlabelled data); ``skipped``: ``(len(REASONS),)`` int64, how many unreadable samples or files were
    replaced to produce it, per reason (``fcmae.data.policy``).
    """

    image: Tensor
    target: Tensor | int
    skipped: Tensor


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed per (run seed, epoch, sample index)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def sample_mask(s: int, grid: tuple[int, int], ratio: float) -> Tensor:
    """The mask ``(h*w,)`` bool (True = removed) of the sample whose seed is ``s`` (its own generator, derived from
    ``s``: the same mask wherever and whenever the sample is made)."""
    g = torch.Generator().manual_seed(s ^ 0x5DEECE66D)
    return random_masking(1, grid, ratio, generator=g)[0]


class EpochSampler(Sampler[int]):
    """A random permutation per epoch, seeded by ``(seed, epoch)``; ``use_epoch`` picks the epoch.

    Deliberately not named ``set_epoch``: accelerate calls ``set_epoch(<its own iteration count>)`` on samplers,
    which restarts at 0 in a resumed process and would replay the wrong epoch's order.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return iter(torch.randperm(self.num_samples, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


class SeededSamples(Dataset):
    """``base[indices[i]]`` with its augmentation (and optionally a random mask) seeded per sample.

    ``base``: a ``SampleBase`` (any other dataset of ``(image, label, ...)`` items is read through ``Items``).
    Output: a ``Sample`` ``(image (C, H, W), label int, skipped (R,))`` with ``label = -1`` unless ``labelled``,
    or with ``mask_grid`` set ``(image, mask (h*w,) bool, skipped)`` (pretraining; ``True`` = removed).

    With ``seed`` set, every item's randomness is a function of ``(seed, epoch, index)`` only, so a sample does not
    depend on workers or on what ran before: our transforms draw from ``sample_generator()`` (a NumPy generator
    seeded per sample: microseconds); ``seed_globals`` also seeds the global generators for the item (``seeded``),
    for third-party transforms that draw from them (timm's and torchvision's). Set the epoch with ``use_epoch``
    before iterating (DataLoader workers are re-created every epoch, so they see it).
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None, seed: int | None = None,
                 labelled: bool = True, mask_grid: tuple[int, int] | None = None, mask_ratio: float = MASK_RATIO,
                 seed_globals: bool = True, finish: Callable[[Any], Tensor] | None = None) -> None:
        self.base: SampleBase = base if isinstance(base, SampleBase) else Items(base)
        self.indices = list(indices) if indices is not None else list(range(len(base)))  # type: ignore[arg-type]
        self.seed = seed
        self.labelled = labelled
        self.mask_grid = mask_grid
        self.mask_ratio = mask_ratio
        self.seed_globals = seed_globals
        self.finish = finish
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def use_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation the next iteration draws (not ``set_epoch``: see ``EpochSampler``)."""
        self.epoch = epoch

    def _seeded_item(self, index: int, s: int) -> tuple[Any, int, int]:
        with seeded(s, self.seed_globals):
            return self.base.sample(self.indices[index])

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        """A batch, as the DataLoader fetches one; the same items as ``[self[i] for i in indices]``. The base reads
        the batch's raw data first (``fetch``); with ``finish``, every item's first phase runs before any is
        finished (``fcmae.data.transforms.DecodeCrop`` says why)."""
        with self.base.fetch([self.indices[i] for i in indices]):
            firsts = [self._first_phase(i) for i in indices]
        return [self._finished(i, *first) for i, first in zip(indices, firsts)]

    def __getitem__(self, index: int) -> Sample:
        return self._finished(index, *self._first_phase(index))

    def _first_phase(self, index: int) -> tuple[Sample, int]:
        """Item ``index`` up to ``finish`` (seeded), and the base's item behind it (``last_used``)."""
        s = sample_seed(self.seed, self.epoch, index) if self.seed is not None else None
        image, label, skipped = self.base.sample(self.indices[index]) if s is None else self._seeded_item(index, s)
        # a count of replaced images, or (sources that know more reasons) a per-reason vector
        used = self.base.last_used
        counts = skipped if isinstance(skipped, Tensor) else skip_vector(BAD_IMAGE, skipped)
        if self.mask_grid is None:
            return Sample(image, label if self.labelled else -1, counts), used
        mask = sample_mask(s if s is not None else index, self.mask_grid, self.mask_ratio)
        return Sample(image, mask, counts), used

    def _finished(self, index: int, sample: Sample, used: int) -> Sample:
        """``sample`` with ``finish`` applied to its image. A file that fails there goes to the base's ``reject``
        (logged and replaced by the next file, or raised, as a file that fails to decode in the first phase) and
        the item is made again (its seeds unchanged), so the skip rules hold whichever phase finds a bad file."""
        while self.finish is not None:
            try:
                return sample._replace(image=self.finish(sample.image))
            except BadImageError as exc:
                self.base.reject(used, exc)
                sample, used = self._first_phase(index)
        return sample


# 1 while a trainer's loop runs in the main process; shared with the DataLoader workers it forks (see
# ignore_stop_signals). A RawValue in shared memory: a worker reads it from its signal handler without a lock.
_TRAINING: Any = None


def shield_workers(active: bool) -> None:
    """Main process: while ``active``, DataLoader workers forked from here ignore SIGTERM (the trainer decides when
    the run stops, and ends its workers itself); afterwards a SIGTERM ends them again, as ``multiprocessing``
    expects of the daemon workers it terminates (and then waits for) at interpreter exit."""
    global _TRAINING
    if _TRAINING is None:
        import multiprocessing

        _TRAINING = multiprocessing.RawValue("b", 0)
    _TRAINING.value = int(active)


def _worker_sigterm(signum: int, frame: Any) -> None:
    if _TRAINING is not None and _TRAINING.value:
        return  # the main process got it too (a scheduler signals the whole job): it stops the run
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # end as a terminated worker is expected to


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores SIGINT, and SIGTERM while the trainer runs.

    A terminal's Ctrl-C (and a scheduler's signal to the process group) reaches the workers too; PyTorch's worker
    then ends itself and the main process dies of "DataLoader worker exited unexpectedly" instead of stopping
    cleanly. Ignoring them leaves the decision to the main process, whose trainer finishes the step, saves and
    exits; the workers end with it (they watch their parent). SIGTERM is ignored only while the parent trains
    (``shield_workers``), so ``multiprocessing``'s terminate-and-wait at exit still ends a worker left alive.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def closing_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """``loader``'s batches; the DataLoader's worker processes are ended as soon as the iteration raises, and when
    it ends or breaks.

    Why: an error raised in a worker (a bad image with ``data.on_bad_image=error``) leaves the DataLoader's iterator
    referenced by the traceback until interpreter exit; ``multiprocessing`` then terminates the workers itself and
    PyTorch's SIGCHLD handler turns their deaths into a second, multi-line error after the one-line message. The
    iterator may sit under wrappers (accelerate's, a generator): it is found in the frames the error passed."""
    it = iter(loader)
    try:
        yield from it
    except BaseException as exc:
        _end_workers(exc.__traceback__)
        raise
    finally:
        shutdown = getattr(it, "_shutdown_workers", None) or getattr(it, "close", None)
        if shutdown is not None:
            shutdown()


def _end_workers(tb: Any) -> None:
    """Shut down every multi-process DataLoader iterator found in the frames of traceback ``tb``."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, _MultiProcessingDataLoaderIter):
                value._shutdown_workers()
        tb = tb.tb_next
