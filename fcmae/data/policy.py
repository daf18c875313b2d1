"""The bad-data policy, one for every source: skip, count per reason, name the file; or stop in one line.

A damaged sample (an image that does not decode, a sample without an image) or a damaged container (a tar that ends
early or mid-member, a parquet file that cannot be read) is, with ``data.on_bad_image=skip`` (the default):
replaced so that every stream keeps its length (every rank takes the same steps), counted under its reason in the
sample's ``skipped`` vector (``REASONS``; summed by the trainer into ``summary.json``/metrics), and logged once, in
one line naming the shard or file and the key. With ``data.on_bad_image=error`` the first one stops the run with
that line. A run whose skipped share passes ``data.max_skipped_fraction`` stops too (``check_skipped_fraction``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from fcmae.data.images import BadImageError, DataError

logger = logging.getLogger("fcmae.data")

# why a sample was replaced; index r of a sample's ``skipped`` vector counts reason REASONS[r]
REASONS: tuple[str, ...] = ("bad_image", "no_image", "no_label", "truncated", "unreadable")
BAD_IMAGE, NO_IMAGE, NO_LABEL, TRUNCATED, UNREADABLE = range(len(REASONS))


class SkippedTooMuchError(DataError):
    """The share of replaced samples passed ``data.max_skipped_fraction``."""


class StreamEndedError(DataError):
    """A data stream ended before its epoch did (it must never: streams pad themselves to their planned length)."""


def skip_vector(reason: int | None = None, count: int = 1) -> Tensor:
    """A sample's ``skipped`` counts ``(len(REASONS),)`` int64: zeros, or ``count`` under ``reason``."""
    v = torch.zeros(len(REASONS), dtype=torch.long)
    if reason is not None:
        v[reason] = count
    return v


def bad_data(on_bad: str, message: str, seen: set[str] | None = None) -> None:
    """Apply the policy to one damaged sample or container described by ``message`` (naming the shard or file and
    the key): ``error`` raises :class:`BadImageError` with it; ``skip`` logs it once per process (``seen`` holds
    the messages already logged)."""
    if on_bad == "error":
        raise BadImageError(f"{message} (data.on_bad_image=error)")
    if seen is not None:
        if message in seen:
            return
        seen.add(message)
    logger.warning("skipping: %s (data.on_bad_image=skip)", message)


def skip_counts() -> list[int]:
    """A run's per-reason totals before anything was skipped (``TrainState.skipped``)."""
    return [0] * len(REASONS)


def add_skipped(totals: list[int], rows: Sequence[Sequence[float]], seen: int, epoch_images: int,
                bound: float) -> None:
    """Add every process's per-reason counts (``rows``, one per process) to the run's ``totals`` (in place), then
    apply ``check_skipped_fraction``."""
    for row in rows:
        for r, c in enumerate(row):
            totals[r] += int(c)
    check_skipped_fraction(sum(totals), seen, epoch_images, bound)


def skipped_summary(counts: Sequence[int]) -> dict[str, int]:
    """``{reason: count}`` of a per-reason count vector, for summary.json and metrics."""
    return {r: int(c) for r, c in zip(REASONS, counts)}


def check_skipped_fraction(skipped: int, seen: int, epoch_images: int, bound: float) -> None:
    """Stop (:class:`SkippedTooMuchError`) once more than ``bound`` of the data was replaced.

    The share is taken over ``max(seen, epoch_images)``: within the first epoch the count only grows, so passing
    ``bound x epoch_images`` there means the epoch will end above the bound; a few bad samples early in a run do
    not stop it. ``bound >= 1`` never stops."""
    if bound < 1.0 and skipped > bound * max(seen, epoch_images):
        raise SkippedTooMuchError(
            f"{skipped} of {seen} samples so far were skipped as unreadable (more than data.max_skipped_fraction="
            f"{bound:g} of {max(seen, epoch_images)}); see the warnings naming them, repair the data or raise the "
            "bound")


def check_epoch_complete(batches: int, planned: int, epoch: int) -> None:
    """The data loader of an epoch ended after ``batches`` of its ``planned`` batches: a stream ran dry. Re-entering
    the epoch would start new workers that find the stream dry again (a loop that spawns workers without end), so
    this is an error."""
    if batches < planned:
        raise StreamEndedError(f"the training data ended after {batches} of the {planned} batches of epoch "
                               f"{epoch + 1}; the data changed while training (a shard or file shrank or vanished)?")
