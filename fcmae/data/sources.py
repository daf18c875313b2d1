"""The data sources, in one table: what ``data.source`` may name, what each needs, and the module that builds it.

Pure Python (no torch): the config validation reads this table too, and a config error must stay fast.

A source is a module of ``fcmae.data`` and a row here. Its functions (named ``module:function``) build either
- map-style data (``kind="map"``; ``fcmae.data.protocol.SampleBase``, wrapped by ``SeededSamples`` in
  ``fcmae.data.builders``, which adds the seeded augmentation, masks, the two-phase decode and label budgets):
  ``pretrain(cfg, in_chans, deferred) -> SampleBase`` (items ``(image, -1, n_skipped)``, first ``cfg.limit``) and
  ``finetune(cfg, in_chans, train_tf, val_tf) -> (train SampleBase with targets, val SampleBase, class names)``; or
- a stream (``kind="stream"``; ``fcmae.data.protocol.BatchStream``, dealt to processes and workers by itself):
  ``pretrain(cfg, in_chans, seed, mask_grid, mask_ratio) -> BatchStream`` and
  ``finetune(cfg, in_chans, seed) -> FinetuneData``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Source:
    """One ``data.source``.

    ``pretrain``/``finetune``: ``"module:function"`` in ``fcmae.data`` ("" = not available for that task).
    ``path``: how pretraining finds its data: ``required`` (``data.path``), ``optional`` (a default location) or
    ``none``. ``splits``: how fine-tuning does: ``path`` (``data.path`` holds both splits), ``split``
    (``data.train_path`` and ``data.val_path``), ``either`` or ``optional``. ``image_files``: it reads image files
    (``data.decode=gpu``, ``data.file_list``). ``extra``: the pip extra it needs, if any.
    """

    name: str
    kind: Literal["map", "stream"]
    pretrain: str
    finetune: str
    path: Literal["required", "optional", "none"]
    splits: Literal["path", "split", "either", "optional", ""]
    image_files: bool = False
    extra: str = ""

    @property
    def streamed(self) -> bool:
        """A stream deals its data to processes x workers: the worker count shapes the order (and ``data.limit``
        and label budgets do not apply)."""
        return self.kind == "stream"


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("demo", "map", "fashion_mnist:demo_pretrain", "", "none", ""),
    Source("folder", "map", "folders:pretrain_files", "folders:folder_splits", "required", "split", image_files=True),
    Source("imagenet", "map", "folders:pretrain_files", "folders:imagenet_splits", "required", "path",
           image_files=True),
    Source("fashion_mnist", "map", "fashion_mnist:fashion_pretrain", "fashion_mnist:fashion_splits", "optional",
           "optional"),
    Source("webdataset", "stream", "shards:pretrain_stream", "shards:finetune_streams", "required", "split"),
    Source("hf", "map", "hf:pretrain_rows", "hf:finetune_rows", "required", "either", extra="hf"),
    Source("hf_stream", "stream", "hf_stream:pretrain_stream", "hf_stream:finetune_streams", "required", "either",
           extra="hf"),
)}


def source_names(task: Literal["pretrain", "finetune"]) -> list[str]:
    """The sources that can feed ``task``."""
    return [s.name for s in SOURCES.values() if getattr(s, task)]


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r} is not one of {sorted(SOURCES)}")
    return SOURCES[name]


def builder(name: str, task: Literal["pretrain", "finetune"]) -> Callable[..., Any]:
    """The function that builds source ``name``'s data for ``task`` (its module is imported here)."""
    target = getattr(get_source(name), task)
    if not target:
        raise ValueError(f"data.source={name} cannot be used for {task} (use one of {source_names(task)})")
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(f"fcmae.data.{module}"), function)
