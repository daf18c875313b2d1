"""The two contracts every data source implements, so that the trainers and ``SeededSamples`` need not guess.

A source (``fcmae.data.sources`` registers them) gives the trainer either
- a map-style dataset: ``SeededSamples`` over a ``SampleBase`` (folders, the ImageNet layout, Fashion-MNIST, the demo
  set, Hugging Face datasets), ordered by the trainer's seeded ``EpochSampler`` and split by accelerate; or
- a ``BatchStream`` (tar shards): an ``IterableDataset`` that deals its data to processes and workers itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch.utils.data import Dataset


class SampleBase(Dataset):
    """What ``SeededSamples`` reads a source's map-style dataset through.

    ``sample(i)`` -> ``(image, label, n_skipped)``: the image (after the dataset's own transform), its label (``-1``
    where there is none) and how many unreadable items were replaced to make it (counted as ``bad_image``).
    ``fetch(indices)``: a context in which a batch's raw data is read ahead (by default nothing is).
    ``reject(j, exc)``: item ``j`` failed in a later phase (``SeededSamples.finish``): raise ``exc``, or log it and
    never use ``j`` again (the policy of ``fcmae.data.policy``). ``last_used``: the item behind the last ``sample``
    (what ``reject`` takes; -1 when unknown).
    """

    last_used = -1

    def sample(self, index: int) -> tuple[Any, int, int]:
        raise NotImplementedError

    def fetch(self, indices: Sequence[int]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reject(self, j: int, exc: Exception) -> None:
        raise exc


class Items(SampleBase):
    """Any dataset whose items are ``(image, label, ...)`` as a ``SampleBase`` (nothing skipped): a ``Subset``, a
    test's synthetic set."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def sample(self, index: int) -> tuple[Any, int, int]:
        item = self.dataset[index]
        return item[0], int(item[1]), 0


@runtime_checkable
class BatchStream(Protocol):
    """A streamed training set (``ShardStream``): it plans every epoch from ``(seed, epoch)`` and the deal.

    ``configure(rank, world, batch_size, num_workers)``: once, before iterating; it deals the data to the
    ``world x workers`` streams and checks they can all fill a batch. ``use_epoch(e)`` before each epoch;
    ``skip_batches(k)`` (a resume) after it: the first ``k`` batches of this rank are passed over without decoding.
    Every rank yields the same number of batches; items are ``Sample``s whose ``skipped`` counts damaged data per
    reason (``fcmae.data.policy``).
    """

    def configure(self, rank: int, world: int, batch_size: int, num_workers: int) -> None: ...

    def use_epoch(self, epoch: int) -> None: ...

    def skip_batches(self, k: int) -> None: ...


@dataclass
class FinetuneData:
    """Training/validation sets (items ``(image, label, n_skipped)``) and what the run reports about them."""

    train: Any  # SeededSamples, or a ShardStream (webdataset)
    val: Any
    classes: list[str]
    train_total: int  # images available before the label budget (after data.limit)
    train_counts: dict[int, int]  # images per class kept for training

    def describe_budget(self, cfg: Any) -> str:
        if not self.train_counts:  # shards: sized by their index, not counted per class
            return f"{self.train_total} training images in shards"
        n = sum(self.train_counts.values())
        if n == self.train_total:
            return f"{n} training images"
        per = sorted(set(self.train_counts.values()))
        per_txt = str(per[0]) if len(per) == 1 else f"{per[0]}-{per[-1]}"
        return (f"label budget: {n} of {self.train_total} training images ({per_txt} per class; train_fraction "
                f"{cfg.train_fraction:g}, labels_per_class {cfg.labels_per_class}, seed {cfg.label_seed})")
