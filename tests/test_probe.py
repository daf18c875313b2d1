"""Frozen-feature evaluation (k-NN, linear probe), the collapse metric, GRN-free models, probe/diagnose/monitor."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

from fcmae import create_model
from fcmae.cli import main
from fcmae.evaluation.collapse import channel_cosine_distance, collapse_profile
from fcmae.evaluation.features import evaluate_features, knn_predict, linear_probe, summarise
from fcmae.models.fcmae import create_fcmae
from fcmae.models.masking import random_masking
from fcmae.models.reference import create_reference_fcmae
from fcmae.weights.layouts import (
    check_against_model,
    dense_to_timm,
    detect_layout,
    infer_variant,
    timm_to_dense,
    to_dense,
)

VARIANT = "convnextv2_test"


# ------------------------------------------------------------------------------------------- k-NN, linear probe
def test_knn_hand_made_features_known_answer():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.05]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.tensor([[2.0, 0.1], [0.05, 3.0], [-0.5, 0.0]])  # cosine: the scale does not matter
    assert knn_predict(train, labels, queries, 3, k=1).tolist() == [0, 1, 2]
    # k=3: the single very similar neighbour of class 0 outvotes two far ones of class 1 (weights exp(sim / T))
    train2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    labels2 = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.02]])
    assert knn_predict(train2, labels2, q, 2, k=3, temperature=0.07).item() == 0
    # ... while an infinite temperature is a plain majority vote
    assert knn_predict(train2, labels2, q, 2, k=3, temperature=1e6).item() == 1
    # k larger than the memory is clipped
    assert knn_predict(train2, labels2, q, 2, k=50).item() == 0


def test_linear_probe_separates_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(4).repeat_interleave(30)
    x = centres[y] + torch.randn(120, 16, generator=g) * 0.5
    yq = torch.arange(4).repeat_interleave(10)
    xq = centres[yq] + torch.randn(40, 16, generator=g) * 0.5
    pred, wd = linear_probe(x, y, xq, 4)
    assert torch.equal(pred, yq) and wd > 0
    res = evaluate_features(x, y, xq, yq, 4, k=5)
    assert res["knn_top1"] == 100.0 and res["linear_top1"] == 100.0
    rows = summarise([{"labels_per_class": 5, "train_images": 20, "knn_top1": 50.0, "linear_top1": 60.0},
                      {"labels_per_class": 5, "train_images": 20, "knn_top1": 70.0, "linear_top1": 60.0}])
    assert rows[0]["knn_top1_mean"] == 60.0 and rows[0]["knn_top1_std"] == 10.0 and rows[0]["seeds"] == 2


# ------------------------------------------------------------------------------------------- collapse metric
def test_cosine_distance_identical_and_orthogonal_channels():
    g = torch.Generator().manual_seed(0)
    one = torch.rand(2, 4, 4, 1, generator=g)
    same = one * torch.tensor([1.0, 2.0, 0.5, 3.0])  # four channels, one map at different positive scales
    assert torch.allclose(channel_cosine_distance(same), torch.zeros(2), atol=1e-6)
    c = 8  # one-hot maps: channel i lights position i only, so every pair is orthogonal
    ortho = torch.eye(16)[:, :c].reshape(1, 4, 4, c)
    assert math.isclose(channel_cosine_distance(ortho).item(), 0.5 * (1 - 1 / c), rel_tol=1e-6)
    # against the definition, with the C x C matrix
    x = torch.randn(3, 5, 5, 6, generator=g)
    v = torch.nn.functional.normalize(x.flatten(1, 2), dim=1)
    ref = ((1 - v.transpose(1, 2) @ v) / 2).mean(dim=(1, 2))
    assert torch.allclose(channel_cosine_distance(x), ref, atol=1e-6)


def test_collapse_profile_one_value_per_block_and_image():
    model = randomize_(create_model(VARIANT, num_classes=0))
    dist, act = collapse_profile(model, torch.randn(5, 3, 64, 64).split(2), keep_layer=3)
    assert dist.shape == (sum(model.depths), 5) and ((dist >= 0) & (dist <= 0.5)).all()
    assert act.shape == (5, 4, 4, 4 * model.dims[2])  # stage 2: 1/16 of 64 px


# ------------------------------------------------------------------------------------------- use_grn
def test_use_grn_false_removes_exactly_the_grn_parameters():
    for build in (lambda g: create_model(VARIANT, num_classes=10, use_grn=g),
                  lambda g: create_fcmae(VARIANT, decoder_depth=2, decoder_embed_dim=16, use_grn=g),
                  lambda g: create_reference_fcmae(VARIANT, decoder_depth=2, decoder_embed_dim=16, use_grn=g)):
        with_grn, without = build(True).state_dict(), build(False).state_dict()
        removed = set(with_grn) - set(without)
        assert not set(without) - set(with_grn)
        assert removed == {k for k in with_grn if ".grn." in k} and removed
        assert all(without[k].shape == with_grn[k].shape for k in without)


@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_encoder_without_grn_equals_masked_dense_reference(batch, rng):
    torch.manual_seed(0)
    ours = randomize_(create_fcmae(VARIANT, decoder_embed_dim=32, use_grn=False))
    ref = create_reference_fcmae(VARIANT, decoder_embed_dim=32, use_grn=False)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, 3, 96, 128, generator=rng)
    mask = random_masking(batch, (3, 4), 0.6, generator=rng)
    a, b = ours.forward_encoder(x, mask), ref.forward_encoder(x, mask)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    la, lb = ours(x, mask)["loss"], ref(x, mask)["loss"]
    assert abs(la.item() - lb.item()) < 1e-5 * abs(lb.item())
    la.backward()
    lb.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        q = ref_params[name].grad
        assert (p.grad - q).abs().max() <= 1e-4 * q.abs().max().clamp_min(1e-12), name
    # mask ratio 0: the dense GRN-free model
    dense = create_model(VARIANT, num_classes=0, use_grn=False)
    dense.load_state_dict(ours.encoder.state_dict(), strict=False)
    zero = torch.zeros(batch, 12, dtype=torch.bool)
    assert torch.allclose(ours.forward_encoder(x, zero), dense.forward_features(x), atol=1e-5, rtol=1e-4)


def test_grn_free_weights_convert_load_and_export(tmp_path: Path):
    from fcmae.weights.files import save_state_dict
    from fcmae.weights.loader import WeightsError, load_encoder, load_weights

    mae = randomize_(create_fcmae(VARIANT, decoder_embed_dim=16, use_grn=False))
    sd = mae.state_dict()
    dense, layout = to_dense(sd)
    assert layout == "fcmae" and not any(".grn." in k for k in dense)
    assert detect_layout(dense) == "dense" and infer_variant(dense) == VARIANT
    assert check_against_model(dense, VARIANT) == VARIANT
    path = save_state_dict(tmp_path / "enc.safetensors", dense, {})
    model, info = load_encoder(path)
    assert model.use_grn is False and info["layout"] == "dense"
    with pytest.raises(WeightsError, match="no GRN.*use_grn"):
        load_weights(create_model(VARIANT, num_classes=0), path)
    # timm/transformers have GRN everywhere: the export adds identity GRNs and computes the same function
    back = timm_to_dense(dense_to_timm(dense, VARIANT))
    assert {k for k in back if ".grn." in k} and all(back[k].abs().max() == 0 for k in back if ".grn." in k)
    with_grn = create_model(VARIANT, num_classes=0)
    with_grn.load_state_dict(back, strict=False)
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(with_grn.forward_features(x), model.forward_features(x), atol=1e-6)


# ------------------------------------------------------------------------------------------- commands
def _class_folder(root: Path, per_class: int = 6) -> Path:
    """Two classes of 32 px images: bright left half vs bright right half (plus noise)."""
    rs = np.random.default_rng(0)
    for c, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rs.integers(0, 60, (32, 32), dtype=np.uint8)
            img[:, :16] += 180 if c == 0 else 0
            img[:, 16:] += 180 if c == 1 else 0
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_probe_command_random_init_and_raw_pixels(tmp_path: Path, capsys):
    data = _class_folder(tmp_path / "data")
    out = tmp_path / "probe.json"
    args = ["probe", "--train", str(data), "--val", str(data), "--input-size", "32", "--in-chans", "1",
            "--labels-per-class", "2", "0", "--label-seeds", "0", "1", "--knn-k", "3", "--no-progress",
            "--num-workers", "0"]
    assert main([*args, "--raw-pixels", "--json", str(out)], reexec=False) == 0
    r = json.loads(out.read_text())
    assert [row["labels_per_class"] for row in r["summary"]] == [2, 0] and r["summary"][0]["seeds"] == 2
    assert r["summary"][1]["knn_top1_mean"] == 100.0 and r["summary"][1]["linear_top1_mean"] == 100.0
    assert r["feature_dim"] == 32 * 32 and len(r["runs"]) == 3
    assert main([*args, "--random-init", VARIANT, "--no-grn", "--json", str(out)], reexec=False) == 0
    r = json.loads(out.read_text())
    assert r["feature_dim"] == 32 and r["use_grn"] is False
    assert "labels/class" in capsys.readouterr().out
    assert main([*args, "--random-init", VARIANT, "--raw-pixels"], reexec=False) == 1
    assert "exactly one of" in capsys.readouterr().err


def test_diagnose_command(tmp_path: Path, capsys, monkeypatch):
    data = _class_folder(tmp_path / "data")
    args = ["diagnose", "--random-init", VARIANT, "--random-init-no-grn", VARIANT, "--data", str(data),
            "--out", str(tmp_path / "diag"), "--input-size", "64", "--num-images", "4", "--channels", "3"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert main(args, reexec=False) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "pip install 'fcmae[examples]'" in err
        return
    assert main(args, reexec=False) == 0
    r = json.loads((tmp_path / "diag" / "diagnose.json").read_text())
    assert [m["use_grn"] for m in r["models"]] == [True, False] and len(r["models"][0]["distance"]) == 5
    assert (tmp_path / "diag" / "cosine_distance.png").is_file() and (tmp_path / "diag" / "activations.png").is_file()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert main(args, reexec=False) == 1
    assert "pip install 'fcmae[examples]'" in capsys.readouterr().err


def test_monitor_config_needs_both_sets():
    from fcmae.config import ConfigError, PretrainConfig, load_config

    with pytest.raises(ConfigError, match="monitor.val"):
        load_config(PretrainConfig, "demo", ["monitor.train=fashion_mnist:train"])
    with pytest.raises(ConfigError, match="monitor.k"):
        load_config(PretrainConfig, "demo", ["monitor.train=a", "monitor.val=b", "monitor.k=0"])
    assert load_config(PretrainConfig, "demo", ["model.use_grn=false"]).model.use_grn is False


def test_knn_monitor_measures_an_encoder(tmp_path: Path):
    from fcmae.config import MonitorConfig
    from fcmae.train.monitor import KnnMonitor

    data = _class_folder(tmp_path / "data")
    cfg = MonitorConfig(train=str(data), val=str(data), train_size=8, val_size=6, k=3)
    mon = KnnMonitor(cfg, VARIANT, 1, 64, use_grn=False)
    mae = create_fcmae(VARIANT, in_chans=1, use_grn=False)
    res = mon.measure(mae.encoder)
    assert 0.0 <= res["knn_top1"] <= 100.0 and res["knn_seconds"] > 0 and mon.cache is not None
