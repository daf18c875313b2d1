"""The k-NN monitor of pretraining: is the representation getting better while the run goes on?

Every so often (``monitor`` config section) the encoder's current weights are loaded into a dense ConvNeXt V2 (the
sparse encoder at mask ratio 0 computes the same function, see tests/test_sparse.py), features of fixed, seeded,
stratified subsets of two labelled sets are computed, and the top-1 of DINO's weighted k-NN classifier is returned
(:mod:`fcmae.evaluation.features`). The images are decoded once and kept in memory when they fit in ``CACHE_BYTES``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

CACHE_BYTES = 512 * 2**20


class KnnMonitor:
    """k-NN top-1 of an encoder on ``cfg.val`` with ``cfg.train`` as memory (a ``MonitorConfig``)."""

    def __init__(self, cfg: Any, model_name: str, in_chans: int, input_size: int, use_grn: bool | None,
                 data_root: str | None = None) -> None:
        from fcmae.data import build_eval_transform, dataset_targets, first_per_class, labelled_dataset
        from fcmae.weights.loader import create_model

        self.cfg = cfg
        tf = build_eval_transform(input_size, 1.0, in_chans)  # the whole image, as pretraining sees it
        root = cfg.data_root or data_root or None
        train, classes = labelled_dataset(cfg.train, tf, in_chans, root)
        val, val_classes = labelled_dataset(cfg.val, tf, in_chans, root)
        if val_classes != classes:
            raise ValueError(f"monitor.train {cfg.train} and monitor.val {cfg.val} have different classes")
        self.num_classes = len(classes)
        self.sets = [(train, first_per_class(dataset_targets(train), cfg.train_size)),
                     (val, first_per_class(dataset_targets(val), cfg.val_size))]
        self.dense = create_model(model_name, num_classes=0, in_chans=in_chans, use_grn=use_grn).eval()
        self.dense.requires_grad_(False)
        n = sum(len(idx) for _, idx in self.sets)
        self.cache: list[tuple[Tensor, Tensor]] | None = None
        if n * in_chans * input_size * input_size * 4 <= CACHE_BYTES:
            self.cache = [self._stack(ds, idx) for ds, idx in self.sets]

    @staticmethod
    def _stack(ds: Any, idx: list[int]) -> tuple[Tensor, Tensor]:
        """Decoded images ``(N, C, S, S)`` and labels ``(N,)`` of ``ds[idx]``."""
        items = [ds[i] for i in idx]
        return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])

    def _batches(self, which: int) -> Any:
        bs = self.cfg.batch_size
        if self.cache is not None:
            x, y = self.cache[which]
            return [(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]
        from fcmae.data import SeededSamples

        ds, idx = self.sets[which]
        return torch.utils.data.DataLoader(SeededSamples(ds, idx), batch_size=bs, shuffle=False, num_workers=0)

    @torch.no_grad()
    def measure(self, encoder: nn.Module) -> dict[str, float]:
        """``{"knn_top1": %, "knn_seconds": s}`` of the encoder's current weights (a sparse or dense trunk)."""
        from fcmae.evaluation.features import accuracy, extract_features, knn_predict, standardise

        t0 = time.perf_counter()
        device = next(encoder.parameters()).device
        self.dense.to(device)
        missing, unexpected = self.dense.load_state_dict(encoder.state_dict(), strict=False)
        if unexpected or any(not k.startswith("norm.") for k in missing):  # the final norm is unused here
            raise RuntimeError(f"k-NN monitor: encoder weights do not fit ({unexpected[:3]}, {missing[:3]})")
        (tr_x, tr_y), (va_x, va_y) = (extract_features(self.dense, self._batches(i), device) for i in (0, 1))
        tr_x, va_x = standardise(tr_x, va_x)
        pred = knn_predict(tr_x, tr_y, va_x, self.num_classes, self.cfg.k, self.cfg.temperature)
        return {"knn_top1": accuracy(pred, va_y), "knn_seconds": time.perf_counter() - t0}
