"""Shared test helpers: deterministic threads, randomised weights."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize_(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (GRN gamma/beta and LayerNorm included) so no layer is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
