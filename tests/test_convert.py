"""Weight-file reading/writing (``fcmae.weights.files``), layout conversion (``fcmae.weights.layouts``) and
``fcmae convert``."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from checkpoint_formats import minkowski_kernel as _minkowski_kernel
from checkpoint_formats import official_decoder as _official_decoder
from checkpoint_formats import to_official_dense as _to_official_dense
from checkpoint_formats import to_official_sparse as _to_official_sparse
from conftest import randomize_
from safetensors import safe_open
from safetensors.torch import save_file

from fcmae import create_model, list_models
from fcmae.cli import main
from fcmae.models.fcmae import create_fcmae
from fcmae.weights.files import WeightFileError, load_state_dict_file, save_state_dict
from fcmae.weights.layouts import (
    ConversionError,
    check_against_model,
    dense_to_timm,
    detect_layout,
    expected_dense_shapes,
    fcmae_to_dense,
    infer_in_chans,
    infer_variant,
    official_dense_to_dense,
    official_sparse_to_dense,
    sparse_kernel_to_dense,
    timm_to_dense,
    to_dense,
)

VARIANT = "convnextv2_test"
StateDict = dict[str, torch.Tensor]


# --- builders ----------------------------------------------------------------------------------------------------

def _fcmae(in_chans: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(create_fcmae(VARIANT, in_chans=in_chans, decoder_embed_dim=32), seed=seed).eval()


def _dense(num_classes: int = 0, in_chans: int = 3, seed: int = 0, name: str = VARIANT) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(create_model(name, num_classes=num_classes, in_chans=in_chans), seed=seed).eval()


def _encoder_sd(model: torch.nn.Module) -> StateDict:
    """Dense weights without the final norm/head: what a pretraining encoder holds."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("norm.", "head."))}


def _assert_equal_sd(got: StateDict, want: StateDict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def _fake_dense(name: str, num_classes: int = 0, in_chans: int = 3) -> StateDict:
    # meta tensors: shapes only, so even convnextv2_huge costs nothing
    return {k: torch.empty(s, device="meta") for k, s in expected_dense_shapes(name, num_classes, in_chans).items()}


# --- our FCMAE checkpoint ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_chans", [3, 1])
def test_fcmae_to_dense_equals_encoder_at_mask_ratio_zero(in_chans):
    fc = _fcmae(in_chans)
    sd = fc.state_dict()
    assert detect_layout(sd) == "fcmae"
    dense, layout = to_dense(sd)
    assert layout == "fcmae"
    assert not any(k.startswith(("proj.", "decoder.", "pred.", "mask_token", "encoder.")) for k in dense)
    assert infer_variant(dense) == VARIANT and infer_in_chans(dense) == in_chans
    model = create_model(VARIANT, num_classes=0, in_chans=in_chans).eval()
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert sorted(missing) == ["norm.bias", "norm.weight"] and not unexpected
    x = torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fc.forward_encoder(x, mask=torch.zeros(2, 4, dtype=torch.bool))
        got = model.forward_features(x)
    assert got.shape == want.shape == (2, 32, 2, 2)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_fcmae_under_ddp_prefix_and_unplaced_keys():
    sd = {f"module.{k}": v for k, v in _fcmae().state_dict().items()}
    dense, layout = to_dense(sd)
    assert layout == "fcmae" and "stages.0.0.grn.gamma" in dense
    with pytest.raises(ConversionError, match=r"encoder\.extra\.weight|extra\.weight"):
        fcmae_to_dense({**_fcmae().state_dict(), "encoder.extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match="optimizer_thing"):
        fcmae_to_dense({**_fcmae().state_dict(), "optimizer_thing": torch.zeros(3)})


# --- official layouts -------------------------------------------------------------------------------------------

def test_sparse_kernel_axes():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (C_out, C_in, k, k)
    k = _minkowski_kernel(w)
    assert k.shape == (4, 3, 2)
    assert torch.equal(sparse_kernel_to_dense(k), w)
    # offset 1 is (y=1, x=0): the swap a plain reshape would miss
    assert torch.equal(k[1], w[:, :, 1, 0].t())
    dw = torch.randn(5, 1, 7, 7)
    assert torch.equal(sparse_kernel_to_dense(_minkowski_kernel(dw)[:, 0, :]), dw)
    with pytest.raises(ConversionError, match="not a square"):
        sparse_kernel_to_dense(torch.zeros(5, 4))


def test_official_sparse_to_dense_exact():
    want = _encoder_sd(_dense(seed=1))
    for k in ("stages.0.0.dwconv.weight", "downsample_layers.1.1.weight"):
        assert not torch.equal(want[k], want[k].transpose(-1, -2))  # an axis swap cannot go unnoticed
    sparse = _to_official_sparse(want)
    assert sparse["encoder.stages.1.0.dwconv.kernel"].shape == (49, 16)
    assert sparse["encoder.downsample_layers.2.1.kernel"].shape == (4, 16, 24)
    assert detect_layout(sparse) == "official_sparse"
    got, layout = to_dense(sparse)
    assert layout == "official_sparse"
    _assert_equal_sd(got, want)
    _assert_equal_sd(official_sparse_to_dense(sparse), want)
    assert infer_variant(got) == VARIANT
    with pytest.raises(ConversionError, match="downsample_layers.1.1.weird"):
        official_sparse_to_dense({**sparse, "encoder.downsample_layers.1.1.weird": torch.zeros(1)})


@pytest.mark.parametrize("prefix", ["module.", "", "module.encoder."])
def test_official_dense_to_dense_exact(prefix):
    with_head = prefix != "module.encoder."
    model = _dense(num_classes=10 if with_head else 0, seed=2)
    want = {k: v.clone() for k, v in model.state_dict().items()} if with_head else _encoder_sd(model)
    off = _to_official_dense(want, prefix)
    assert off[f"{prefix}stages.2.1.grn.gamma"].shape == (1, 1, 1, 96)
    if prefix.endswith("encoder."):
        off.update(_official_decoder(prefix="module."))
    assert detect_layout(off) == "official_dense"
    got, layout = to_dense(off)
    assert layout == "official_dense"
    _assert_equal_sd(got, want)
    _assert_equal_sd(official_dense_to_dense(off), want)
    if with_head:
        assert check_against_model(got, "test") == VARIANT
        model2 = create_model(VARIANT, num_classes=10)
        model2.load_state_dict(got, strict=True)


# --- timm -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
def test_dense_to_timm_same_logits(name):
    timm = pytest.importorskip("timm")
    ours = _dense(num_classes=1000, seed=4, name=name)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    timm_sd = dense_to_timm(sd, name)
    assert detect_layout(timm_sd) == "timm"
    theirs = timm.create_model(name, pretrained=False).eval()
    theirs.load_state_dict(timm_sd, strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == b.shape == (1, 1000)
    assert a.std() > 0.5  # logits of order 10: not a degenerate comparison
    assert float((a - b).abs().max()) <= 1e-4
    back, layout = to_dense(timm_sd)
    assert layout == "timm"
    _assert_equal_sd(back, sd)
    _assert_equal_sd(timm_to_dense(timm_sd), sd)
    assert infer_variant(back) == name


# --- detection, variants, shape checks --------------------------------------------------------------------------

def test_detect_layout_each_and_unknown():
    dense = _dense(num_classes=5).state_dict()
    assert detect_layout(dense) == "dense"
    assert detect_layout(_fcmae().state_dict()) == "fcmae"
    assert detect_layout(_to_official_sparse(_encoder_sd(_dense()))) == "official_sparse"
    assert detect_layout(_to_official_dense(dense)) == "official_dense"
    assert detect_layout(dense_to_timm(dense, VARIANT)) == "timm"
    with pytest.raises(ConversionError, match=r"unrecognised.*fc1\.weight"):
        detect_layout({"fc1.weight": torch.zeros(2, 2), "fc1.bias": torch.zeros(2)})
    got, layout = to_dense(dense)
    assert layout == "dense"
    _assert_equal_sd(got, dense)


@pytest.mark.parametrize("name", list_models())
def test_infer_variant_every_registered_variant(name):
    assert infer_variant(_fake_dense(name)) == name
    assert infer_in_chans(_fake_dense(name, in_chans=1)) == 1
    assert check_against_model(_fake_dense(name, num_classes=7), name) == name


def test_infer_variant_unknown_dims():
    sd = _fake_dense(VARIANT)
    sd["stages.2.2.dwconv.weight"] = torch.empty(24, 1, 7, 7, device="meta")  # a third block in stage 2
    with pytest.raises(ConversionError, match=r"no registered variant has depths \(1, 1, 3, 1\)"):
        infer_variant(sd)


@pytest.mark.parametrize(("name", "num_classes", "in_chans"), [(VARIANT, 0, 3), (VARIANT, 5, 1), ("atto", 10, 3)])
def test_expected_shapes_match_create_model(name, num_classes, in_chans):
    model = create_model(name, num_classes=num_classes, in_chans=in_chans)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_dense_shapes(name, num_classes, in_chans) == want


def test_check_against_model_mismatch():
    dense = _dense().state_dict()
    with pytest.raises(ConversionError) as info:
        check_against_model(dense, "convnextv2_atto")
    msg = str(info.value)
    assert "convnextv2_atto" in msg and "expected (40, 3, 4, 4), found (8, 3, 4, 4)" in msg
    bad = dict(dense)
    bad["stages.0.0.grn.gamma"] = torch.zeros(31)
    with pytest.raises(ConversionError, match=r"stages\.0\.0\.grn\.gamma expected \(32,\), found \(31,\)"):
        check_against_model(bad, VARIANT)
    del bad["stages.0.0.grn.gamma"]
    with pytest.raises(ConversionError, match=r"stages\.0\.0\.grn\.gamma missing"):
        check_against_model(bad, VARIANT)


# --- io ---------------------------------------------------------------------------------------------------------

def test_save_load_roundtrip_safetensors_and_pt(tmp_path):
    base = torch.randn(4, 6)
    sd = {"a": base, "tied": base, "view": base[1:3], "t": base.t(), "half": torch.randn(3).half()}
    for name in ("w.safetensors", "w.pt", "w.pth"):
        path = save_state_dict(tmp_path / name, sd, {"variant": "x", "n": 3})
        got, md = load_state_dict_file(path)
        assert md == {"variant": "x", "n": "3"}
        _assert_equal_sd(got, {k: v.contiguous() for k, v in sd.items()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt", "w.pth", "w.safetensors"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    for name in ("w.pt", "w.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name  # not mkstemp's private 0600


def test_load_unwraps_training_checkpoints(tmp_path):
    sd = {"w": torch.ones(2)}
    for i, wrapper in enumerate([{"model": sd, "epoch": 3, "optimizer": {"state": {}}}, {"state_dict": sd},
                                 {"model_ema": sd}, {"module": sd},
                                 {"model": sd, "state_dict": {"x": torch.zeros(1)}}]):
        torch.save(wrapper, tmp_path / f"c{i}.pth")
        got, md = load_state_dict_file(tmp_path / f"c{i}.pth")
        _assert_equal_sd(got, sd)
        assert md == {}
    torch.save(sd, tmp_path / "plain.bin")
    _assert_equal_sd(load_state_dict_file(tmp_path / "plain.bin")[0], sd)


@pytest.mark.parametrize("fname", ["model.safetensors", "pytorch_model.bin"])
def test_load_accelerate_directory(tmp_path, fname):
    ckpt = tmp_path / "checkpoint_3"
    ckpt.mkdir()
    sd = {"w": torch.arange(3.0)}
    if fname.endswith(".safetensors"):
        save_file(sd, str(ckpt / fname), metadata={"format": "pt"})
    else:
        torch.save(sd, ckpt / fname)
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.bin")
    _assert_equal_sd(load_state_dict_file(ckpt)[0], sd)


class _NotATensor:
    pass


def test_load_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not weights\n")
    (tmp_path / "notes.pt").write_text("hello, not weights\n")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": _NotATensor()}, f)
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _NotATensor()}, tmp_path / "obj.pt")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "zero.pt").write_bytes(b"")
    cases = {
        "missing.pt": "no such file",
        "notes.txt": "not a PyTorch or safetensors checkpoint",
        "notes.pt": "not a PyTorch or safetensors checkpoint",
        "meta.pt": "holds no tensors",
        "evil.pt": "pickle references test_convert._NotATensor, which is refused",  # named from a raw pickle too
        "obj.pt": "pickle references test_convert._NotATensor, which is refused",
        "zero.pt": "file is empty",
        "empty_dir": "directory holds no model weights",
    }
    for name, problem in cases.items():
        with pytest.raises(WeightFileError) as info:
            load_state_dict_file(tmp_path / name)
        msg = str(info.value)
        assert "\n" not in msg and name in msg and problem in msg, msg
        assert isinstance(info.value, ValueError)


# --- CLI --------------------------------------------------------------------------------------------------------

def test_cli_converts_fcmae_checkpoint(tmp_path, capsys):
    fc = _fcmae()
    src = tmp_path / "pretrain.pt"
    torch.save({"model": fc.state_dict(), "epoch": 7}, src)
    out = tmp_path / "exports" / "encoder.safetensors"
    assert main(["convert", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fcmae" in printed and VARIANT in printed and "in_chans: 3" in printed and "converted 66 tensors" in printed
    with safe_open(str(out), framework="pt") as f:
        md = f.metadata()
    assert md == {"variant": VARIANT, "in_chans": "3", "source_layout": "fcmae", "format": "dense"}
    got, md2 = load_state_dict_file(out)
    assert md2 == md
    _assert_equal_sd(got, fcmae_to_dense(fc.state_dict()))
    # and again from the export itself, to timm, as .pt, checked against an explicit --model
    out_timm = tmp_path / "encoder_timm.pt"
    assert main(["convert", str(out), str(out_timm), "--to", "timm", "--model", "test"]) == 0
    assert "dense" in capsys.readouterr().out
    got_timm, md3 = load_state_dict_file(out_timm)
    assert md3["format"] == "timm" and md3["source_layout"] == "dense" and md3["variant"] == VARIANT
    assert detect_layout(got_timm) == "timm"


def test_cli_converts_official_sparse_accelerate_dir(tmp_path, capsys):
    want = _encoder_sd(_dense(seed=9))
    ckpt = tmp_path / "checkpoint_0"
    ckpt.mkdir()
    save_file(_to_official_sparse(want), str(ckpt / "model.safetensors"))
    out = tmp_path / "dense.safetensors"
    assert main(["convert", str(ckpt), str(out)]) == 0
    assert "official_sparse" in capsys.readouterr().out
    _assert_equal_sd(load_state_dict_file(out)[0], want)


def _expect_failure(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    out = Path(argv[2])
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert main(argv) != 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("fcmae convert: error:") and "\n" not in err and message in err, err
    assert not out.exists()
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before  # no temp files either


def test_cli_errors_write_nothing(tmp_path, capsys):
    text = tmp_path / "readme.txt"
    text.write_text("not weights")
    _expect_failure(tmp_path, capsys, ["convert", str(text), str(tmp_path / "o1.safetensors")],
                    "not a PyTorch or safetensors checkpoint")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"fc1.weight": torch.zeros(2, 2)}, str(unknown))
    _expect_failure(tmp_path, capsys, ["convert", str(unknown), str(tmp_path / "o2.safetensors")],
                    "unrecognised checkpoint layout")
    good = tmp_path / "pretrain.pt"
    torch.save({"model": _fcmae().state_dict()}, good)
    _expect_failure(tmp_path, capsys, ["convert", str(good), str(tmp_path / "o3.pt"), "--model", "convnextv2_atto"],
                    "expected (40, 3, 4, 4), found (8, 3, 4, 4)")
    _expect_failure(tmp_path, capsys, ["convert", str(good), str(tmp_path / "o4.pt"), "--model", "nope"],
                    "unknown model 'nope'")
    extra = tmp_path / "extra.pt"
    torch.save({**_fcmae().state_dict(), "encoder.stages.0.0.layer_scale": torch.zeros(8)}, extra)
    _expect_failure(tmp_path, capsys, ["convert", str(extra), str(tmp_path / "o5.safetensors")],
                    "stages.0.0.layer_scale")
    _expect_failure(tmp_path, capsys, ["convert", str(tmp_path / "absent.pt"), str(tmp_path / "o6.safetensors")],
                    "no such file")
