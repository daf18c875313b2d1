"""A stage: a run of residual blocks that owns its loop and its activation-checkpointing flag.

The one loop over blocks of the dense model, the sparse encoder, the FCMAE decoder and the MinkowskiEngine encoder
(timm's ``ConvNeXtStage`` shape, without the downsample, which stays in ``downsample_layers`` so that parameter names
are the official ones). It is an ``nn.Sequential``, so its children are named ``0, 1, ...`` exactly as before: state
dict keys (``stages.2.5.pwconv1.weight``, ``decoder.0.grn.gamma``) do not change, and neither does any checkpoint
format or converter. It is generic over the block type: any module whose ``forward(x, *args, **kwargs)`` returns the
next ``x`` slots in (ConvNeXt V2 blocks, V1 blocks with layer scale, the sparse blocks of ``minkowski.py``).

With ``grad_checkpointing`` on (``set_grad_checkpointing``; the config's ``run.grad_checkpointing``), each block's
activations are not kept for backward: only its input is, and the block runs again during backward
(``torch.utils.checkpoint`` without reentrancy). Per block, because a ConvNeXt block keeps ~15 channel-widths of
activations per position (the 4x-wide expansion, GELU, GRN) against one for its input, so one block per segment
already cuts the stored activations by an order of magnitude while the recomputation peak stays one block's.
``preserve_rng_state`` restores the RNG (CPU and device) before the recomputation, so drop path draws the same
samples in both runs: losses and gradients equal those without checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Stage(nn.Sequential):
    """Blocks applied in order: ``forward(x, *args, last=None, **kwargs)`` runs ``x = block(x, *args, **kwargs)``
    for every block, the last one with ``last`` (a dict of extra keyword arguments, e.g. ``{"rows": rows}`` for the
    decoder's last block, which computes only at chosen cells). Shapes are the blocks' own (dense ``(N, C, H, W)``,
    sparse tokens ``(N, T, C)``, ...). An empty stage returns ``x``.
    """

    def __init__(self, blocks: Iterable[nn.Module] = ()) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: Any, *args: Any, last: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        # checkpoint only when a backward will follow: under no_grad/inference it would save nothing, only cost
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        final = len(self) - 1
        for i, block in enumerate(self):
            kw = {**kwargs, **last} if last and i == final else kwargs
            if ckpt:
                # through the module's __call__ (hooks, FSDP's parameter gathering) in both runs
                x = checkpoint(block, x, *args, use_reentrant=False, preserve_rng_state=True, **kw)
            else:
                x = block(x, *args, **kw)
        return x


def set_grad_checkpointing(module: nn.Module, enable: bool = True) -> None:
    """Turn activation checkpointing on or off in every ``Stage`` under ``module`` (timm's method name on the
    models; this is what they call)."""
    for m in module.modules():
        if isinstance(m, Stage):
            m.grad_checkpointing = bool(enable)
