"""Random patch masks for FCMAE.

A mask lives on the encoder's final grid (one cell per 32x32 pixels): a bool tensor ``(N, L)`` with
``L = h * w`` cells in row-major order, ``True`` = removed. Every image keeps exactly
``max(1, int(L * (1 - mask_ratio)))`` cells (``num_kept``), so the visible positions of a batch form a regular
tensor; a pretraining config where the ``max`` matters, or that removes nothing, is refused
(``fcmae.config.PretrainConfig.validate``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fcmae.models.registry import MASK_RATIO, check_mask_ratio, num_kept

__all__ = ["MASK_RATIO", "check_mask_ratio", "check_on_device", "kept_indices", "num_kept", "random_masking",
           "upsample_mask"]


def _grid(grid_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid_size, int):
        return grid_size, grid_size
    h, w = grid_size
    return int(h), int(w)


def random_masking(
    batch_size: int,
    grid_size: int | tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random masks: bool ``(batch_size, h * w)``, True = removed, the same count removed per image.

    The random draws come from ``generator`` (on CPU unless the generator lives elsewhere), so a seeded
    generator gives the same masks on every device.
    """
    h, w = _grid(grid_size)
    num = h * w
    keep = num_kept(num, mask_ratio)
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch_size, num, generator=generator, device=gen_device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each cell's noise within its row
    mask = ranks >= keep
    return mask.to(device) if device is not None else mask


def check_on_device(cond: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless the bool scalar ``cond`` holds, without stalling an accelerator.

    Eager on CPU the value is read at once. Elsewhere reading it would wait for the device queue to drain (a
    host-device synchronisation every training step), so the check is queued on the device instead
    (``torch._assert_async``): a failure surfaces as a device-side assertion at the next synchronisation. Under
    ``torch.compile`` (any device) the check is ``torch._assert_async`` too: a host read would break the graph;
    a failure there raises a ``RuntimeError`` when the compiled step runs.
    """
    if cond.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(cond):
            raise ValueError(message)
    else:
        torch._assert_async(cond, message)


def kept_indices(mask: Tensor, num_keep: int | None = None) -> Tensor:
    """Indices of visible cells, ascending, ``(N, K)`` int64, for a mask with the same count per row.

    ``num_keep``: the known count ``K`` (e.g. ``num_kept(L, mask_ratio)``), checked with ``check_on_device`` so
    a training step never waits for the device; without it ``K`` is read from the mask (a host read).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (N, L), got {tuple(mask.shape)}")
    visible = (~mask.bool()).sum(dim=1)
    if num_keep is not None:
        if not 0 < num_keep <= mask.shape[1]:
            raise ValueError(f"num_keep must be in [1, {mask.shape[1]}], got {num_keep}")
        check_on_device((visible == num_keep).all(), f"every image of the mask must keep {num_keep} of "
                        f"{mask.shape[1]} cells (num_keep), as masks drawn with the model's mask_ratio do")
        k = num_keep
    else:
        if visible.numel() and not bool((visible == visible[0]).all()):
            raise ValueError(
                f"every image must keep the same number of cells; visible cells per image: {visible.tolist()}"
            )
        k = int(visible[0]) if visible.numel() else 0
        if k == 0:
            raise ValueError("mask removes every cell of an image; at least one cell must stay visible")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return order[:, :k]


def upsample_mask(mask: Tensor, grid_size: int | tuple[int, int], scale: int) -> Tensor:
    """``(N, h * w)`` mask -> ``(N, h * scale, w * scale)`` mask at a finer stage (nearest neighbour)."""
    h, w = _grid(grid_size)
    m = mask.reshape(mask.shape[0], h, w)
    return m.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
