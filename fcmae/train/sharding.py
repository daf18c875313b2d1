"""Whole weights of a possibly sharded model: what exports, figures and the k-NN monitor work from.

Under FSDP no process holds the whole model, and a forward of the live model is a collective (every rank gathers
every block's parameters), so a process alone must never run one. Instead every process takes part in gathering
the full state dict (:func:`full_state_dict`, a collective), and the main process then loads it into a plain,
unsharded copy built from the config for its figure or monitor forward, and writes exports from it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def full_state_dict(model: nn.Module, accelerator: Any = None) -> dict[str, Tensor]:
    """The whole state dict of ``model``, detached CPU tensors with the plain model's names; call it on every
    process (it is a collective when the model is sharded).

    - FSDP through accelerate (``accelerate launch --use_fsdp``, FSDP 1 or 2): ``accelerator.get_state_dict``,
      whole on the main process (FSDP 1 leaves the others empty);
    - parameters that are DTensors (``torch.distributed.fsdp.fully_shard``, also on a model accelerate did not
      wrap): each is gathered with ``full_tensor()``, in the same order on every rank;
    - anything else (one process, DDP, an EMA copy): the unwrapped model's tensors, copied to the CPU.
    """
    from torch.distributed.tensor import DTensor

    sd = accelerator.get_state_dict(model) if accelerator is not None else model.state_dict()
    out = {}
    for k, v in sd.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        out[k] = v.detach().cpu()
    return out


def load_plain(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """``model`` (a plain copy, e.g. built from the run's config) with ``state`` loaded strictly, in eval mode."""
    model.load_state_dict(state, strict=True)
    return model.eval()
