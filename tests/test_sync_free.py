"""The training step never reads a device value back to the host (on a GPU that stalls the stream every step),
and the deferred non-finite-loss check still stops a run before anything trained on a bad loss is saved."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fcmae.models.masking as masking
from fcmae.config import PretrainConfig, load_config
from fcmae.models.fcmae import create_fcmae
from fcmae.models.masking import random_masking
from fcmae.train.pretraining import run_pretraining
from fcmae.train.trainer import NonFiniteLossError
from fcmae.weights.loader import create_model

# ops that copy a device value to the host (Tensor.item / bool / int / tolist) or need one to size their output
_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _device_assert(cond, message):
    torch._assert_async(cond, message)  # what check_on_device does on an accelerator


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_sparse_training_step_reads_nothing_back(monkeypatch, drop_path):
    # the only host read on the step's path is check_on_device's, which accelerators queue on the device instead.
    # The optimizer step is left out: AdamW keeps its step counters on the CPU unless fused/capturable.
    monkeypatch.setattr(masking, "check_on_device", _device_assert)
    model = create_fcmae("convnextv2_test", decoder_embed_dim=32, drop_path_rate=drop_path)
    imgs = torch.randn(3, 3, 64, 64)
    mask = random_masking(3, 2, 0.6, generator=torch.Generator().manual_seed(0))
    with _HostReads() as reads:
        model(imgs, mask, num_keep=1)["loss"].backward()
    assert reads.seen == []


def test_dense_training_step_reads_nothing_back():
    model = create_model("convnextv2_test", num_classes=5, drop_path_rate=0.2)
    with _HostReads() as reads:
        F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 4])).backward()
    assert reads.seen == []


def test_mask_with_another_count_than_num_keep_is_refused():
    model = create_fcmae("convnextv2_test", decoder_embed_dim=32)
    mask = random_masking(2, 2, 0.5)  # keeps 2 of 4 cells
    with pytest.raises(ValueError, match="must keep 1 of 4 cells"):
        model(torch.randn(2, 3, 64, 64), mask, num_keep=1)
    assert torch.isfinite(model(torch.randn(2, 3, 64, 64), mask)["loss"])  # without num_keep: read from the mask


def test_non_finite_loss_stops_before_saving(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, [
        "model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
        "data.input_size=64", "data.limit=16", "data.num_workers=0", "optim.lr=1e-3", "optim.steps=8",
        "optim.warmup_steps=1", "run.batch_size=2", "run.log_every=4", "run.save_every_steps=2",
        "run.export_every_epochs=0", "run.progress=false", "run.threads=1", f"run.output_dir={out}"])

    def poison(trainer) -> None:  # after step 3 every weight of the stem is NaN: the loss of step index 3 is NaN
        if trainer.state.step == 3:
            with torch.no_grad():
                trainer.unwrapped.encoder.downsample_layers[0][0].weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3 "):
        run_pretraining(cfg, hooks=[poison])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    metrics = out / "metrics.jsonl"  # the first log line (step 4) would have held a NaN: none was written
    logged = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    assert [r for r in logged if "loss" in r] == []


def test_whole_trainer_micro_step_reads_nothing_back_and_copies_without_blocking(tmp_path, monkeypatch):
    """The trainer's micro-steps as a GPU runs them: the batch from the loader, its copy to the device, forward, loss,
    backward, AdamW (fused, lr tensors: what CUDA gets) and the pending values, with no host read between the steps
    that log or save. A blocking copy cannot be seen on a CPU, so the copy's arguments are recorded instead."""
    import functools

    import accelerate.data_loader as acc_loader

    import fcmae.train.trainer as trainer_mod

    monkeypatch.setattr(masking, "check_on_device", _device_assert)  # what an accelerator does
    monkeypatch.setattr(trainer_mod, "build_optimizer", functools.partial(trainer_mod.build_optimizer, fused=True))
    copies: list[bool] = []
    send = acc_loader.send_to_device

    def recording_send(obj, device, non_blocking=False, **kw):
        copies.append(non_blocking)
        return send(obj, device, non_blocking=non_blocking, **kw)

    monkeypatch.setattr(acc_loader, "send_to_device", recording_send)
    pins: list[bool] = []
    loader_init = torch.utils.data.DataLoader.__init__

    def recording_init(self, *args, **kw):
        pins.append(kw.get("pin_memory", False))
        loader_init(self, *args, **kw)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", recording_init)
    reads = _HostReads()
    paused = [0]

    def pause(fn):  # host reads are expected (and allowed) in these: they log, save or end an epoch
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            paused[0] += 1
            try:
                return fn(*args, **kw)
            finally:
                paused[0] -= 1
        return wrapper

    finish = trainer_mod.Trainer._finish
    for name in ("_flush", "_log_step", "save"):
        monkeypatch.setattr(trainer_mod.Trainer, name, pause(getattr(trainer_mod.Trainer, name)))
    micro_step = trainer_mod.Trainer._micro_step
    gate = _Gated(reads, paused)

    def recorded_micro_step(self, batch):  # from the first batch on: the loop, the loader's next batch, its copy
        if self.state.batch_in_epoch == 0:  # (the loader's iterator reads its CPU seed once per epoch: not here)
            gate.__enter__()
        return micro_step(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "_micro_step", recorded_micro_step)
    monkeypatch.setattr(trainer_mod.Trainer, "_finish", pause(lambda self: (gate.__exit__(None, None, None),
                                                                             finish(self))[1]))
    cfg = load_config(PretrainConfig, None, [
        "model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
        "data.input_size=64", "data.limit=16", "data.num_workers=1", "optim.lr=1e-3", "optim.steps=6",
        "optim.warmup_steps=1", "run.batch_size=2", "run.log_every=3", "run.export_every_epochs=0",
        "run.num_vis_images=2", "run.progress=false", "run.threads=1", "run.mixed_precision=no",
        f"run.output_dir={tmp_path / 'run'}"])
    summary = run_pretraining(cfg)
    assert summary["steps"] == 6 and summary["status"] == "finished"
    assert reads.seen == []
    assert copies and all(copies)  # every batch copied with non_blocking=True
    assert pins and all(p == torch.cuda.is_available() for p in pins)  # pinned (for async copies) on CUDA


class _Gated(TorchDispatchMode):
    """Forwards ops to ``reads`` (a _HostReads) unless a paused section is running."""

    def __init__(self, reads: _HostReads, paused: list[int]) -> None:
        super().__init__()
        self.reads, self.paused = reads, paused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused[0] == 0 and func.overloadpacket.__name__ in _HOST_READS:
            self.reads.seen.append(str(func))
        return func(*args, **(kwargs or {}))
