"""Feature-collapse diagnostics of the ConvNeXt V2 paper (Woo et al. 2023, Fig. 3 and 4).

The paper looks at the output of every block's dimension-expansion MLP layer (``pwconv1`` -> GELU: the ``4C``
activations before GRN). A block whose channels all respond alike has collapsed; GRN is the paper's remedy. Its
measure: for one image and one layer with channel maps ``X_i`` (``H*W``-vectors),
``d = 1/C^2 * sum_i sum_j (1 - cos(X_i, X_j)) / 2``, averaged over images: 0 when every channel is the same map
(up to a positive scale), ``(1 - 1/C) / 2`` when they are mutually orthogonal.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def channel_cosine_distance(act: Tensor) -> Tensor:
    """Average pairwise cosine distance between channels, per image.

    act: ``(N, H, W, C)`` channels-last activations -> ``(N,)``. Uses ``mean_ij cos(X_i, X_j) = ||sum_i X_i/|X_i|||^2
    / C^2`` (no ``C x C`` matrix); an all-zero channel counts as orthogonal to every channel, itself included.
    """
    x = F.normalize(act.flatten(1, 2).double(), dim=1)  # (N, HW, C), each channel map of unit length
    c = x.shape[-1]
    mean_cos = x.sum(dim=2).pow(2).sum(dim=1) / (c * c)
    return ((1.0 - mean_cos) / 2.0).float()


def expansion_layers(model: nn.Module) -> list[nn.Module]:
    """The GELU after ``pwconv1`` of every block, in depth order (its output is the ``(N, H, W, 4C)`` activation)."""
    return [blk.act for stage in model.stages for blk in stage]


@torch.no_grad()
def collapse_profile(model: nn.Module, batches: Iterable[Tensor], keep_layer: int | None = None,
                     device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """Per-block channel cosine distance of a dense ConvNeXt V2 over images.

    batches: ``(B, C, H, W)`` image tensors. Returns ``(distances (num_blocks, N) per block and image, the activation
    ``(N, H, W, 4C)`` of block ``keep_layer`` or None)``.
    """
    layers = expansion_layers(model)
    per_block: list[list[Tensor]] = [[] for _ in layers]
    kept: list[Tensor] = []

    def hook(i: int):
        def fn(_mod: nn.Module, _inp: tuple, out: Tensor) -> None:
            per_block[i].append(channel_cosine_distance(out).cpu())
            if i == keep_layer:
                kept.append(out.float().cpu())
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval().to(device)
    try:
        for x in batches:
            model.forward_features(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    dist = torch.stack([torch.cat(d) for d in per_block])
    return dist, (torch.cat(kept) if kept else None)


def normalised_depth(num_blocks: int) -> list[float]:
    """Block ``i`` of ``n`` at depth ``i / (n - 1)`` (0 = first block, 1 = last)."""
    return [i / max(1, num_blocks - 1) for i in range(num_blocks)]
