"""The contract between the trainer and a recipe: what a recipe builds, what it may read, the hooks it gets.

A recipe says only what differs between training runs (torchtune's recipe interface is the model: a handful of
methods, nothing implicit):

- ``setup()`` builds and *returns* the parts (``RecipeParts``: model, train set, optimizer parameter groups); every
  user error in the data or the model surfaces here, before anything is written;
- ``loss(model, batch)`` is the loss of one micro-batch (a ``Sample`` batch, see ``fcmae.data.Sample``);
- the hooks (``after_prepare``, ``after_step``, ``on_epoch_end``, ``finish``) receive a ``TrainContext``: the narrow
  view of the running trainer a recipe may read. ``after_step`` is the one per-step hook mechanism: the trainer calls
  the recipe's, then those passed as ``hooks=`` (e.g. a test's fault injection), each with the context.

``RecipeBase`` gives every optional method a no-op default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from fcmae.data.sampling import Sample


@runtime_checkable
class Stateful(Protocol):
    """Saved with every checkpoint (accelerate ``register_for_checkpointing``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class EpochDataset(Protocol):
    """A map-style training set whose augmentation depends on the epoch (``fcmae.data.SeededSamples``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def use_epoch(self, epoch: int) -> None: ...


@dataclass
class RecipeParts:
    """What ``Recipe.setup`` builds: the model to train, its training set, AdamW's parameter groups."""

    model: nn.Module
    train_set: EpochDataset
    param_groups: list[dict[str, Any]]


@dataclass
class TrainContext:
    """What a recipe's hooks may read from the running trainer (filled in by the trainer after ``prepare``).

    ``model``: the prepared (possibly wrapped) model; ``unwrapped``: the plain module; ``state``: the progress
    counters (``TrainState``: epoch, step, ...); ``schedule``: run length and learning rate (``Schedule``);
    ``log(record)``: one metrics row (main process); ``image(tag, png, step)``: a figure (a PNG file) to the
    trackers of ``run.log_with`` and the run's kept figures (``fcmae.train.tracking``);
    ``say(*text)``: a line on stderr (main process; above the progress bar).
    """

    accelerator: Any
    model: nn.Module
    unwrapped: nn.Module
    optimizer: Any
    state: Any
    schedule: Any
    out_dir: Path
    mixed_precision: str
    resumed_from: Path | None
    log: Callable[[dict[str, Any]], None] = field(repr=False)
    image: Callable[[str, Path, int], None] = field(repr=False)
    say: Callable[..., None] = field(repr=False)

    @property
    def is_main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)


StepHook = Callable[[TrainContext], None]


class Recipe(Protocol):
    """The typed contract (see the module docstring); ``RecipeBase`` has the defaults."""

    name: str

    def setup(self) -> RecipeParts: ...

    def loss(self, model: nn.Module, batch: Sample) -> Tensor: ...

    def after_prepare(self, ctx: TrainContext) -> None: ...

    def stateful(self) -> list[Stateful]: ...

    def describe(self, ctx: TrainContext) -> list[str]: ...

    def train_mode(self, model: nn.Module) -> None: ...

    def after_step(self, ctx: TrainContext) -> None: ...

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> None: ...

    def finish(self, ctx: TrainContext) -> dict[str, Any]: ...


class RecipeBase:
    """No-op defaults for the optional parts of ``Recipe``; a recipe overrides ``setup``, ``loss`` and what differs."""

    name = "train"

    def after_prepare(self, ctx: TrainContext) -> None:
        """Anything that needs the prepared model (evaluation loaders, EMA copies)."""

    def stateful(self) -> list[Stateful]:
        """Extra objects saved with every checkpoint."""
        return []

    def describe(self, ctx: TrainContext) -> list[str]:
        """Lines printed at the start of the run."""
        return []

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def after_step(self, ctx: TrainContext) -> None:
        """After every optimizer step."""

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> None:
        """After epoch ``epoch`` (0-based) completed (not after a run cut short mid-epoch)."""

    def finish(self, ctx: TrainContext) -> dict[str, Any]:
        """At the end of the run (every process); returns entries for the summary."""
        return {}
