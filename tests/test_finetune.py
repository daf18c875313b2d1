"""Fine-tuning: layer-wise lr decay, EMA, head re-initialisation, Mixup switch, label budget, linear probe,
an in-process resume check, configs, and an end-to-end CLI run (pretrain -> convert -> finetune -> evaluate)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cluster_tools import child_env
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from fcmae.config import ConfigError, EmaConfig, FinetuneConfig, MixupConfig, load_config
from fcmae.data import SeededSamples, stratified_subset
from fcmae.train.finetuning import build_ema, build_mixup_and_loss, enable_linear_probe, run_finetuning
from fcmae.train.trainer import param_groups
from fcmae.weights.files import save_state_dict
from fcmae.weights.loader import WeightsError, create_model, fold_probe_head, load_weights

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- layer decay
def _layer_table(model: nn.Module, decay: float, coarse: bool) -> dict[str, tuple[int, float]]:
    """Parameter name -> (layer id, lr scale) from the optimizer groups; ids recovered from the scales."""
    model.layer_decay_type = "group" if coarse else "single"
    groups = param_groups(model, 0.05, decay)
    names = {id(p): n for n, p in model.named_parameters()}
    last = max(round(math.log(g["lr_scale"]) / math.log(decay)) for g in groups)
    return {names[id(p)]: (last - round(math.log(g["lr_scale"]) / math.log(decay)), g["lr_scale"])
            for g in groups for p in g["params"]}


def test_layer_decay_single_atto_matches_the_official_rule():
    model = create_model("convnextv2_atto", num_classes=10)  # depths (2, 2, 6, 2): blocks 0..11, head 12
    table = _layer_table(model, 0.9, coarse=False)
    expected_ids = {  # official optim_factory (single): the stem shares the first block's layer
        "downsample_layers.0.0.weight": 0, "downsample_layers.0.1.bias": 0,
        "stages.0.0.dwconv.weight": 0, "stages.0.1.grn.gamma": 1,
        "downsample_layers.1.0.weight": 2, "downsample_layers.1.1.weight": 2, "stages.1.0.pwconv1.weight": 2,
        "stages.1.1.norm.bias": 3,
        "downsample_layers.2.1.bias": 4, "stages.2.0.pwconv2.weight": 4, "stages.2.5.dwconv.bias": 9,
        "downsample_layers.3.1.weight": 10, "stages.3.0.grn.beta": 10, "stages.3.1.pwconv2.bias": 11,
        "norm.weight": 12, "head.weight": 12, "head.bias": 12,
    }
    for name, lid in expected_ids.items():
        assert table[name][0] == lid, name
        assert table[name][1] == pytest.approx(0.9 ** (12 - lid)), name
    assert set(table) == {n for n, _ in model.named_parameters()}
    assert {lid for lid, _ in table.values()} == set(range(13))


def test_layer_decay_group_base_matches_the_official_ids():
    with torch.device("meta"):
        model = create_model("convnextv2_base")  # depths (3, 3, 27, 3): the official 0..13
    ids = {n: lid for n, (lid, _) in _layer_table(model, 0.6, coarse=True).items()}
    assert ids["downsample_layers.0.1.weight"] == 0
    assert all(ids[f"stages.0.{j}.dwconv.weight"] == 1 for j in range(3))
    assert ids["downsample_layers.1.1.weight"] == 2 and ids["stages.1.2.pwconv1.weight"] == 2
    assert ids["downsample_layers.2.0.bias"] == 3
    assert [ids[f"stages.2.{j}.norm.weight"] for j in range(27)] == [3 + j // 3 for j in range(27)]
    assert ids["downsample_layers.3.1.weight"] == 12 and ids["stages.3.2.grn.gamma"] == 12
    assert ids["norm.bias"] == ids["head.weight"] == 13
    table = _layer_table(model, 0.6, coarse=True)
    assert table["head.weight"][1] == 1.0
    assert table["stages.3.0.dwconv.weight"][1] == pytest.approx(0.6)
    assert table["downsample_layers.0.0.weight"][1] == pytest.approx(0.6 ** 13)
    single = {n: lid for n, (lid, _) in _layer_table(model, 0.6, coarse=False).items()}
    assert single["stages.2.26.dwconv.weight"] == 3 + 3 + 26 and single["head.bias"] == 36  # 36 blocks, head 36


def test_param_groups_weight_decay_and_scales():
    model = create_model("convnextv2_test", num_classes=5)
    model.downsample_layers[0].requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, 0.05, 0.8)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            no_decay = p.ndim <= 1 or n.endswith(".bias")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
    assert "stages.0.0.grn.gamma" in seen and "norm.weight" in seen
    assert not any(n.startswith("downsample_layers.0.") for n in seen)
    assert len(seen) == sum(1 for _, p in model.named_parameters() if p.requires_grad)
    assert max(g["lr_scale"] for g in groups) == 1.0 and min(g["lr_scale"] for g in groups) < 1.0
    flat = param_groups(create_model("convnextv2_test", num_classes=5), 0.05, 1.0)
    assert all(g.get("lr_scale", 1.0) == 1.0 for g in flat)


# ------------------------------------------------------------------------------------------- EMA
def test_ema_update_math():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = build_ema(model, EmaConfig(decay=0.9))
    assert ema is not None and build_ema(model, EmaConfig(enabled=False)) is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update(model, step=1)  # the first update copies
    for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
        model[1].running_mean.fill_(5.0)
    ema.update(model, step=2)
    for k, v in ema.module.state_dict().items():
        cur = model.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * cur)
        else:
            assert torch.equal(v, cur)  # integer buffers (num_batches_tracked) are copied
    assert not any(p.requires_grad for p in ema.parameters())


# ------------------------------------------------------------------------------------------- init / head
def _encoder_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("norm.", "head."))}


def test_head_reinit_absent_wrong_shape_and_kept(tmp_path):
    src = create_model("convnextv2_test", num_classes=7)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.5)
    # absent head and norm (an FCMAE encoder export, in the fcmae layout with a decoder key)
    enc = {f"encoder.{k}": v for k, v in _encoder_sd(src).items()}
    enc["mask_token"] = torch.zeros(1, 32, 1, 1)
    save_state_dict(tmp_path / "enc.safetensors", enc)
    m = create_model("convnextv2_test", num_classes=4)
    info = load_weights(m, tmp_path / "enc.safetensors")
    assert info["layout"] == "fcmae" and info["head_reset"]
    assert info["fresh"] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert torch.equal(m.stages[2][1].pwconv1.weight, src.stages[2][1].pwconv1.weight)
    assert torch.equal(m.norm.weight, torch.ones(32)) and torch.equal(m.norm.bias, torch.zeros(32))
    assert m.head.weight.shape == (4, 32) and torch.equal(m.head.bias, torch.zeros(4))
    w = m.head.weight.detach()
    assert 1e-5 < float(w.std()) < 4e-5 and float(w.abs().max()) < 2e-4  # normal, std 2e-5

    save_state_dict(tmp_path / "full.safetensors", src.state_dict())
    m = create_model("convnextv2_test", num_classes=4)  # wrong head shape (7 classes in the file)
    info = load_weights(m, tmp_path / "full.safetensors")
    assert info["head_reset"] and info["fresh"] == ["head.weight", "head.bias"]
    assert torch.equal(m.norm.weight, src.norm.weight)
    assert float(m.head.weight.detach().abs().max()) < 2e-4 and torch.equal(m.head.bias, torch.zeros(4))

    m = create_model("convnextv2_test", num_classes=7)  # right shape: kept
    info = load_weights(m, tmp_path / "full.safetensors")
    assert not info["head_reset"] and info["fresh"] == []
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k

    m1 = create_model("convnextv2_test", num_classes=7, in_chans=1)  # RGB weights -> gray stem (summed)
    assert load_weights(m1, tmp_path / "full.safetensors")["adapted_stem"]
    torch.testing.assert_close(m1.downsample_layers[0][0].weight, src.downsample_layers[0][0].weight.sum(1, True))

    with pytest.raises(WeightsError, match="do not fit"):
        load_weights(create_model("convnextv2_atto", num_classes=7), tmp_path / "full.safetensors")


def test_linear_probe_freezes_trunk_and_folds_head():
    torch.manual_seed(0)
    m = create_model("convnextv2_test", num_classes=3)
    enable_linear_probe(m)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["head.1.weight", "head.1.bias"]
    m.train()
    m(torch.randn(8, 3, 32, 32))  # BN statistics move
    m.eval()
    x = torch.randn(4, 3, 32, 32)
    plain = create_model("convnextv2_test", num_classes=3)
    plain.load_state_dict(fold_probe_head(m.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), m(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- mixup / loss
def test_mixup_switched_off_cleanly():
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mix, crit = build_mixup_and_loss(MixupConfig(mixup=0.0, cutmix=0.0, smoothing=0.2), 10)
    assert mix is None and isinstance(crit, LabelSmoothingCrossEntropy) and crit.smoothing == 0.2
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.isfinite(crit(logits, labels))  # hard integer labels
    mix, crit = build_mixup_and_loss(MixupConfig(mixup=0.0, cutmix=0.0, smoothing=0.0), 10)
    assert mix is None and type(crit) is nn.CrossEntropyLoss
    mix, crit = build_mixup_and_loss(MixupConfig(mixup=0.8, cutmix=1.0, smoothing=0.1), 10)
    assert isinstance(mix, Mixup) and isinstance(crit, SoftTargetCrossEntropy)
    x, y = mix(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))
    with pytest.raises(ConfigError, match="run.batch_size"):
        load_config(FinetuneConfig, None, ["data.source=fashion_mnist", "run.batch_size=7"])
    load_config(FinetuneConfig, None, ["data.source=fashion_mnist", "run.batch_size=7", "mixup.mixup=0",
                                       "mixup.cutmix=0"])


# ------------------------------------------------------------------------------------------- label budget
def test_label_budget_stratified_and_seeded():
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(5), [100, 50, 33, 7, 210])
    rng.shuffle(targets)
    sub = stratified_subset(targets, fraction=0.1, seed=3)
    counts = np.bincount(targets[sub], minlength=5).tolist()
    assert counts == [10, 5, 3, 1, 21]  # round(0.1 * n_c); 3.3 -> 3, 0.7 -> 1, 21
    assert sub == sorted(set(sub))
    assert stratified_subset(targets, fraction=0.1, seed=3) == sub  # same seed, same subset
    assert stratified_subset(targets, fraction=0.1, seed=4) != sub
    assert set(sub) <= set(stratified_subset(targets, fraction=0.5, seed=3))  # nested budgets for one seed
    k = stratified_subset(targets, per_class=7, seed=1)
    assert np.bincount(targets[k], minlength=5).tolist() == [7] * 5
    both = stratified_subset(targets, fraction=0.3, per_class=12, seed=1)
    assert np.bincount(targets[both], minlength=5).tolist() == [12, 12, 10, 2, 12]
    assert np.bincount(targets[stratified_subset(targets, fraction=0.25)]).tolist() == [25, 13, 8, 2, 53]
    with pytest.raises(ValueError, match="class 3 has only 7"):
        stratified_subset(targets, per_class=8)


def test_labeled_samples_seeded_per_index_and_epoch():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i):
            import random

            return torch.rand(2) + np.random.rand() + random.random(), i

    ds = SeededSamples(Noisy(), [3, 1, 2], seed=5)
    a = ds[1]
    torch.rand(5)
    np.random.rand(3)
    assert torch.equal(ds[1][0], a[0]) and a[1] == 1 and a[2].sum() == 0
    ds.epoch = 1
    assert not torch.equal(ds[1][0], a[0])


# ------------------------------------------------------------------------------------------- configs
def test_configs_load_with_official_values():
    cfgs = {v: load_config(FinetuneConfig, f"finetune/convnextv2_{v}")
            for v in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")}
    a, t, b = cfgs["atto"], cfgs["tiny"], cfgs["base"]
    assert (a.optim.blr, a.optim.epochs, a.optim.warmup_epochs, a.optim.layer_decay_type, a.optim.layer_decay,
            a.optim.weight_decay, a.model.drop_path_rate, a.mixup.mixup, a.mixup.cutmix, a.mixup.smoothing) == (
        2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.0, 0.0, 0.2)
    assert (t.optim.blr, t.optim.epochs, t.optim.warmup_epochs, t.optim.layer_decay_type, t.optim.weight_decay,
            t.model.drop_path_rate, t.mixup.mixup, t.mixup.cutmix, t.mixup.smoothing) == (
        8e-4, 300, 40, "single", 0.05, 0.2, 0.8, 1.0, 0.1)
    assert (b.optim.blr, b.optim.epochs, b.optim.warmup_epochs, b.optim.layer_decay_type, b.optim.layer_decay,
            b.model.drop_path_rate) == (6.25e-4, 100, 20, "group", 0.6, 0.1)
    for v, c in cfgs.items():
        assert c.model.name == f"convnextv2_{v}"
        assert c.data.reprob == 0.25 and c.ema.enabled and c.ema.decay == 0.9999
        assert c.data.auto_augment == "rand-m9-mstd0.5-inc1" and c.run.mixed_precision == "auto"
        assert c.run.batch_size * 8 * c.run.accum_iter == 1024  # one 8-GPU node
    fm = load_config(FinetuneConfig, "configs/finetune/fashion_mnist.yaml")
    assert fm.model.in_chans == 1 and fm.data.source == "fashion_mnist" and fm.data.input_size == 64


# ------------------------------------------------------------------------------------------- runs
def _image_folder(root: Path, n_per_class: int, classes=("a", "b", "c"), size: int = 24, seed: int = 0) -> Path:
    """Tiny labelled folder: class k images are noise around brightness 60 + 70 k (learnable)."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            a = np.clip(rng.normal(60 + 70 * k, 20, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(a, mode="L").save(root / c / f"{i}.png")
    return root


def _tiny_cfg(data: Path, out: Path, *extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [
        "model.name=convnextv2_test", "model.in_chans=1", "data.source=folder", f"data.train_path={data / 'train'}",
        f"data.val_path={data / 'val'}", "data.input_size=32", "data.num_workers=0", "optim.lr=1e-3",
        "optim.epochs=2", "optim.warmup_epochs=0.5", "optim.layer_decay=0.8", "optim.layer_decay_type=single",
        "ema.decay=0.9", "run.batch_size=4", "run.progress=false", "run.log_every=1", "run.mixed_precision=no",
        "run.threads=1", f"run.output_dir={out}", *extra])


@pytest.fixture
def one_thread():
    """run.threads=1 sets torch's global thread count (tiny tensors: 2 threads on a busy 2-core machine stall in
    OpenMP barriers, 100x slower); restored for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_in_process_resume_equals_uninterrupted_and_linear_probe(tmp_path, one_thread):
    _image_folder(tmp_path / "data" / "train", 4)
    _image_folder(tmp_path / "data" / "val", 2, seed=1)
    mix = ["mixup.mixup=0.8", "mixup.cutmix=1.0", "model.drop_path_rate=0.2"]  # all random parts on
    ref = run_finetuning(_tiny_cfg(tmp_path / "data", tmp_path / "ref", *mix))
    assert ref["steps"] == 6 and ref["train_images"] == 12
    run_finetuning(_tiny_cfg(tmp_path / "data", tmp_path / "run", *mix, "run.max_steps=4"))
    res = run_finetuning(_tiny_cfg(tmp_path / "data", tmp_path / "run", *mix, "run.resume=auto"))
    assert res["steps"] == 6
    a, b = load_file(str(tmp_path / "ref" / "last.safetensors")), load_file(str(tmp_path / "run" / "last.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    ea, eb = (load_file(str(tmp_path / d / "last_ema.safetensors")) for d in ("ref", "run"))
    assert max(float((ea[k] - eb[k]).abs().max()) for k in ea) <= 1e-6
    recs = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [1, 2] and all("ema_top1" in r for r in evals)
    train = [r for r in recs if "loss" in r and "step" in r]
    assert train[0]["blr"] == pytest.approx(1e-3 * 256 / 4)  # the blr an absolute optim.lr amounts to
    assert train[0]["lr"] == pytest.approx(0.0)  # warmup starts at 0

    probe = run_finetuning(_tiny_cfg(tmp_path / "data", tmp_path / "probe", "run.linear_probe=true",
                                     "data.labels_per_class=2", "ema.enabled=false"))
    assert probe["train_images"] == 6 and probe["ema_top1"] is None
    sd = load_file(str(tmp_path / "probe" / "best.safetensors"))
    assert "head.weight" in sd and not any(k.startswith("head.0") for k in sd)  # BN folded into the head


def _env() -> dict[str, str]:
    e = child_env()
    e.pop("FCMAE_TEST_SIGKILL_AFTER_STEP", None)
    return e


def _fcmae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcmae", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_cli_pretrain_convert_finetune_evaluate(tmp_path):
    pre = _fcmae("pretrain", "model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1",
                 "data.source=demo", "data.input_size=64", "data.limit=16", "data.num_workers=0", "optim.lr=1e-3",
                 "optim.epochs=1", "run.batch_size=8", "run.progress=false", "run.export_every_epochs=0",
                 "run.num_vis_images=2", "run.mixed_precision=no", "run.threads=1",
                 f"run.output_dir={tmp_path / 'pre'}")
    assert pre.returncode == 0, pre.stderr[-3000:]
    conv = _fcmae("convert", tmp_path / "pre" / "encoder.safetensors", tmp_path / "dense.safetensors",
                  "--json", tmp_path / "convert.json")
    assert conv.returncode == 0, conv.stderr[-3000:]
    facts = json.loads((tmp_path / "convert.json").read_text())
    assert facts["variant"] == "convnextv2_test" and facts["in_chans"] == 1 and facts["layout"] == "dense"
    assert json.loads((tmp_path / "pre" / "summary.json").read_text())["steps"] == 2
    data = tmp_path / "data"
    _image_folder(data / "train", 6, size=40)
    _image_folder(data / "val", 3, size=40, seed=1)
    ft = _fcmae("finetune", "model.name=convnextv2_test", "model.in_chans=1", "data.source=folder",
                f"data.train_path={data / 'train'}", f"data.val_path={data / 'val'}", "data.input_size=64",
                "data.num_workers=0", "data.labels_per_class=4", "optim.lr=1e-3", "optim.epochs=2",
                "optim.layer_decay=0.9", "optim.layer_decay_type=single", "mixup.mixup=0", "mixup.cutmix=0",
                "run.batch_size=4", "run.progress=false", "run.mixed_precision=no", "run.threads=1",
                f"run.output_dir={tmp_path / 'ft'}", "--init", tmp_path / "dense.safetensors")
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert "initialised fresh (not in the checkpoint): norm.weight, norm.bias, head.weight, head.bias" in ft.stderr
    assert "label budget: 12 of 18 training images (4 per class" in ft.stderr
    assert "effective batch 4 = 4 x 1 x 1; blr 0.064 -> lr 1.000e-03 (optim.lr given)" in ft.stderr
    for name in ("best.safetensors", "last.safetensors", "last_ema.safetensors", "config.yaml", "metrics.jsonl"):
        assert (tmp_path / "ft" / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "ft" / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    best_line = next(x for x in ft.stdout.splitlines() if x.startswith("best top-1"))
    best = float(best_line.split()[2])
    assert 0.0 <= best <= 100.0

    ev = _fcmae("evaluate", tmp_path / "ft", "--data", data, "--no-progress", "--num-workers", "0",
                "--json", tmp_path / "eval.json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert math.isclose(json.loads((tmp_path / "eval.json").read_text())["top1"], summary["best_top1"], abs_tol=0.01)
    assert "convnextv2_test, 3 classes, in_chans 1" in ev.stdout
    acc = next(x for x in ev.stdout.splitlines() if x.startswith("top-1")).split()
    assert math.isclose(float(acc[1]), best, abs_tol=0.01)  # the best weights, evaluated again
    assert float(acc[3]) == 100.0  # 3 classes: top-5 covers all
    bad = _fcmae("evaluate", tmp_path / "dense.safetensors", "--data", data / "val")
    assert bad.returncode == 1 and "no classifier head" in bad.stderr


def test_epochs_are_counted_one_way_everywhere(tmp_path, one_thread, capsys):
    """Lines, records, the summary and the best weights' metadata all count epochs from 1."""
    import re

    from safetensors import safe_open

    _image_folder(tmp_path / "data" / "train", 4)
    _image_folder(tmp_path / "data" / "val", 2, seed=1)
    s = run_finetuning(_tiny_cfg(tmp_path / "data", tmp_path / "run", "run.log_every=3"))
    err = capsys.readouterr().err
    done = [int(n) for n in re.findall(r"^epoch (\d+)/2 done", err, flags=re.M)]
    evals = [int(n) for n in re.findall(r"^eval after epoch (\d+) ", err, flags=re.M)]
    assert done == evals == [1, 2], err
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["type"] == "eval"] == [1, 2]
    assert [(r["step"], r["epoch"]) for r in recs if r["type"] == "train"] == [(3, 1), (6, 2)]  # 3 steps per epoch
    assert s["epochs"] == 2 and s["best_epoch"] in (1, 2)
    with safe_open(str(tmp_path / "run" / "best.safetensors"), "pt") as f:
        assert int(f.metadata()["epoch"]) == s["best_epoch"]
