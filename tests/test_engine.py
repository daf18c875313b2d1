"""Engine pieces: weight-decay groups, lr scaling and schedule, seeded sampling, checkpoint discovery."""

from __future__ import annotations

import json
import math

import torch

from fcmae.data import EpochSampler, SeededSamples
from fcmae.models.fcmae import create_fcmae
from fcmae.train.trainer import lr_at, param_groups, scaled_lr
from fcmae.weights.checkpoints import find_latest_checkpoint


def test_weight_decay_groups():
    model = create_fcmae("convnextv2_test", decoder_embed_dim=32)
    groups = sorted(param_groups(model, 0.05), key=lambda g: -g["weight_decay"])
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0 and len(groups) == 2
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    params = dict(model.named_parameters())
    # exactly the conv/linear weights decay; every bias, LayerNorm, GRN parameter and the mask token does not
    assert decay == {n for n, p in params.items() if p.ndim >= 2 and n != "mask_token"}
    assert "mask_token" in no_decay and "encoder.downsample_layers.2.0.weight" in no_decay  # a LayerNorm
    assert "encoder.stages.0.0.grn.gamma" in no_decay and "encoder.stages.0.0.norm.weight" in no_decay
    assert "encoder.downsample_layers.0.1.weight" in no_decay  # the stem LayerNorm
    assert "encoder.downsample_layers.0.0.weight" in decay  # the stem conv


def test_lr_scaling_and_schedule():
    assert scaled_lr(1.5e-4, 4096) == 1.5e-4 * 16
    assert scaled_lr(1.5e-4, 256) == 1.5e-4
    base, total, warm = 1e-3, 100, 10
    assert lr_at(0, total, warm, base) == 0.0
    assert math.isclose(lr_at(5, total, warm, base), base / 2)
    assert math.isclose(lr_at(10, total, warm, base), base)
    assert math.isclose(lr_at(55, total, warm, base), base / 2)
    assert math.isclose(lr_at(100, total, warm, base, min_lr=1e-5), 1e-5)
    lrs = [lr_at(s, total, warm, base) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_epoch_sampler_is_seeded_per_epoch():
    s = EpochSampler(50, seed=3)
    a = list(s)
    assert sorted(a) == list(range(50)) and a == list(EpochSampler(50, seed=3))
    s.use_epoch(1)
    assert list(s) != a
    assert list(EpochSampler(50, seed=4)) != a


class _Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.rand(1, 64, 64), 0


def test_masked_samples_reproducible_per_index_and_epoch():
    ds = SeededSamples(_Noise(), seed=0, labelled=False, mask_grid=(2, 2), mask_ratio=0.5)
    x1, m1, _ = ds[3]
    torch.rand(5)  # global RNG state must not matter
    x2, m2, _ = ds[3]
    assert torch.equal(x1, x2) and torch.equal(m1, m2) and int(m1.sum()) == 2
    assert not torch.equal(ds[2][0], x1)
    ds.epoch = 1
    assert not torch.equal(ds[3][0], x1)


def _complete(d, files=None):
    d.mkdir()
    for name, data in (files or {}).items():
        (d / name).write_bytes(data)
    manifest = {"step": 0, "files": {n: len(b) for n, b in (files or {}).items()}}
    (d / "MANIFEST.json").write_text(json.dumps(manifest))


def test_find_latest_checkpoint_ignores_temp_and_incomplete_dirs(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    _complete(tmp_path / "step_00000002")
    _complete(tmp_path / "step_00000010", {"model.safetensors": b"abc"})
    (tmp_path / ".tmp_step_00000020").mkdir()
    (tmp_path / "step_00000030").mkdir()  # no manifest: an interrupted save
    assert find_latest_checkpoint(tmp_path).name == "step_00000010"
    (tmp_path / "step_00000010" / "model.safetensors").write_bytes(b"ab")  # truncated
    assert find_latest_checkpoint(tmp_path).name == "step_00000002"
