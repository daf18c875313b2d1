"""Every checkpoint a ConvNeXt V2 user holds loads; exports load strictly in timm and Hugging Face transformers.

Official files are built from known dense weights exactly as the official code writes them (see
``checkpoint_formats``), saved with ``torch.save``, converted, and must come back bit-equal.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_formats import (
    OPEN_GLOBAL,
    CreateFileOnLoad,
    assert_distinct,
    assert_refuses_code_running_pickles,
    code_running_checkpoints,
    official_args,
    official_trainer_checkpoint,
    released_fcmae_weights,
    released_finetuned_weights,
    to_official_dense,
    to_official_sparse,
)
from conftest import randomize_
from safetensors.torch import load_file

from fcmae import create_model
from fcmae.cli import main
from fcmae.models.fcmae import create_fcmae
from fcmae.weights.files import WeightFileError, load_state_dict_file, read_checkpoint, save_folder, save_state_dict
from fcmae.weights.layouts import ConversionError, detect_layout, to_dense

VARIANT = "convnextv2_test"
StateDict = dict[str, torch.Tensor]


def _dense(num_classes: int = 0, seed: int = 0, in_chans: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(create_model(VARIANT, num_classes=num_classes, in_chans=in_chans), seed=seed).eval()


def _sd(model: torch.nn.Module, encoder_only: bool = False) -> StateDict:
    skip = ("norm.", "head.") if encoder_only else ()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(skip)}
    assert_distinct(sd)
    return sd


def _assert_equal_sd(got: StateDict, want: StateDict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def _x(in_chans: int = 3, n: int = 2) -> torch.Tensor:
    return torch.randn(n, in_chans, 64, 64, generator=torch.Generator().manual_seed(5))


def _features_of(dense: StateDict, in_chans: int = 3) -> torch.Tensor:
    """``forward_features`` of a fresh dense model loaded from ``dense`` (only the final norm/head may be absent)."""
    model = create_model(VARIANT, num_classes=0, in_chans=in_chans).eval()
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected and set(missing) <= {"norm.weight", "norm.bias"}
    with torch.no_grad():
        return model.forward_features(_x(in_chans))


def _convert(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["convert", *map(str, argv)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


# --- 1. released FCMAE weights ------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_decoder", [False, True])
def test_released_fcmae_weights(tmp_path, capsys, with_decoder):
    source = _dense(seed=1)
    want = _sd(source, encoder_only=True)
    path = tmp_path / "convnextv2_test_1k_224_fcmae.pt"
    torch.save(released_fcmae_weights(want, with_decoder), path)
    raw = load_state_dict_file(path)[0]
    assert raw["stages.2.1.grn.gamma"].shape == (1, 96) and ("mask_token" in raw) == with_decoder
    assert detect_layout(raw) == "official_fcmae"
    got, layout = to_dense(raw)
    assert layout == "official_fcmae"
    _assert_equal_sd(got, want)
    with torch.no_grad():
        assert torch.equal(_features_of(got), source.forward_features(_x()))
        loaded = create_model(VARIANT, num_classes=0, pretrained=path).eval()  # the one weight loader
        assert torch.equal(loaded.forward_features(_x()), source.forward_features(_x()))
    out = _convert(capsys, path, tmp_path / "dense.safetensors")
    assert "recognised: official_fcmae (released official FCMAE weights" in out
    assert ("dropped 15 decoder tensors" in out) == with_decoder
    _assert_equal_sd(load_state_dict_file(tmp_path / "dense.safetensors")[0], want)


# --- 2. the official trainer's checkpoint-N.pth --------------------------------------------------------------------

def test_official_pretraining_checkpoint(tmp_path, capsys):
    want = _sd(_dense(seed=2), encoder_only=True)
    path = tmp_path / "checkpoint-799.pth"
    torch.save(official_trainer_checkpoint(to_official_sparse(want), official_args(pretrain=True), 799), path)
    ckpt = read_checkpoint(path)
    assert ckpt.source == "official trainer checkpoint (args: argparse.Namespace, epoch 799), weights from 'model'"
    assert ckpt.metadata["epoch"] == "799" and ckpt.metadata["image_size"] == "64"
    assert json.loads(ckpt.metadata["args"])["mask_ratio"] == 0.6
    got, layout = to_dense(ckpt.state_dict)
    assert layout == "official_sparse"
    _assert_equal_sd(got, want)
    out = _convert(capsys, path, tmp_path / "enc.safetensors")
    assert "read: official trainer checkpoint" in out and "recognised: official_sparse" in out
    got2, md = load_state_dict_file(tmp_path / "enc.safetensors")
    _assert_equal_sd(got2, want)
    assert md["epoch"] == "799" and md["source_layout"] == "official_sparse"
    with pytest.raises(WeightFileError, match=r"checkpoint-799\.pth: no EMA weights \(model_ema or state_dict_ema\)"):
        read_checkpoint(path, ema=True)


@pytest.mark.parametrize("with_ema", [False, True])
def test_official_finetuning_checkpoint(tmp_path, capsys, with_ema):
    model, ema = _dense(num_classes=5, seed=3), _dense(num_classes=5, seed=4)
    want, want_ema = _sd(model), _sd(ema)
    path = tmp_path / "checkpoint-99.pth"
    torch.save(official_trainer_checkpoint(to_official_dense(want, prefix=""), official_args(pretrain=False), 99,
                                           to_official_dense(want_ema, prefix="") if with_ema else None), path)
    got, layout = to_dense(load_state_dict_file(path)[0])
    assert layout == "official_dense"
    _assert_equal_sd(got, want)  # the regular weights unless EMA is asked for
    x = _x()
    with torch.no_grad():
        assert torch.equal(create_model(VARIANT, num_classes=5, pretrained=path).eval()(x), model(x))
        if with_ema:
            from fcmae.weights.loader import load_weights

            clf = create_model(VARIANT, num_classes=5)
            assert load_weights(clf, path, ema=True)["fresh"] == []
            assert torch.equal(clf.eval()(x), ema(x))
    for flag, ref, weights in [([], model, want), (["--ema"], ema, want_ema)][: 2 if with_ema else 1]:
        out = _convert(capsys, path, tmp_path / "out.safetensors", *flag, "--overwrite")  # the 2nd replaces the 1st
        assert f"weights from '{'model_ema' if flag else 'model'}'" in out and "recognised: official_dense" in out
        dense = load_state_dict_file(tmp_path / "out.safetensors")[0]
        _assert_equal_sd(dense, weights)
        clf = create_model(VARIANT, num_classes=5).eval()
        clf.load_state_dict(dense, strict=True)
        with torch.no_grad():
            assert torch.equal(clf(x), ref(x))
    if not with_ema:
        assert main(["convert", str(path), str(tmp_path / "ema.safetensors"), "--ema"]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "checkpoint-99.pth: no EMA weights" in err
        assert not (tmp_path / "ema.safetensors").exists()


# --- 3. released fine-tuned weights --------------------------------------------------------------------------------

def test_released_finetuned_weights(tmp_path, capsys):
    source = _dense(num_classes=5, seed=6)
    want = _sd(source)
    path = tmp_path / "convnextv2_test_1k_224_ema.pt"
    torch.save(released_finetuned_weights(want), path)
    raw = load_state_dict_file(path)[0]
    assert raw["stages.0.0.grn.gamma"].shape == (1, 1, 1, 32)
    got, layout = to_dense(raw)
    assert layout == "official_dense"
    _assert_equal_sd(got, want)
    out = _convert(capsys, path, tmp_path / "ft.pt")
    assert "recognised: official_dense" in out
    clf = create_model(VARIANT, num_classes=5).eval()
    clf.load_state_dict(load_state_dict_file(tmp_path / "ft.pt")[0], strict=True)
    with torch.no_grad():
        assert torch.equal(clf(_x()), source(_x()))


def test_mixed_grn_shapes_named():
    sd = released_fcmae_weights(_sd(_dense(), encoder_only=True), False)["model"]
    sd["stages.0.0.grn.gamma"] = sd["stages.0.0.grn.gamma"].reshape(1, 1, 1, -1)
    with pytest.raises(ConversionError, match=r"GRN gamma shapes are mixed or unknown \(\[\(1, 1, 1, 32\)"):
        detect_layout(sd)


# --- safe loading -------------------------------------------------------------------------------------------------

def test_payload_would_run_without_safe_loading(tmp_path):
    """The check below is meaningful: plain unpickling of the payload does create the file."""
    marker = tmp_path / "created"
    pickle.loads(pickle.dumps(CreateFileOnLoad(marker))).close()
    assert marker.exists()


def test_convert_refuses_code_running_pickles(tmp_path, capsys):
    def run(ckpt: Path) -> int:
        return main(["convert", str(ckpt), str(tmp_path / "out" / "x.safetensors")])

    assert_refuses_code_running_pickles(run, tmp_path / "evil", capsys)
    assert not (tmp_path / "out").exists()


def test_loader_refuses_code_running_pickles(tmp_path):
    for ckpt, marker in code_running_checkpoints(tmp_path):
        with pytest.raises(WeightFileError) as info:
            load_state_dict_file(ckpt)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{ckpt}: pickle references ") and OPEN_GLOBAL in msg, msg
        assert "which is refused" in msg or ckpt.name == "plain_pickle.pt"  # there plain tensors are refused too
        assert not marker.exists()


# --- 4. exports: timm local-dir and Hugging Face ------------------------------------------------------------------

def _fcmae_export(tmp_path: Path, in_chans: int) -> tuple[Path, torch.Tensor]:
    """Encoder weights of an FCMAE model saved as our export does, and the pooled features they must give."""
    fc = randomize_(create_fcmae(VARIANT, in_chans=in_chans, decoder_embed_dim=32), seed=8).eval()
    sd = {k: v.detach().clone() for k, v in fc.encoder.state_dict().items()}
    path = save_state_dict(tmp_path / "encoder.safetensors", sd, {
        "format": "fcmae-encoder", "layout": "dense", "variant": VARIANT, "in_chans": str(in_chans),
        "image_size": "64"})
    model = create_model(VARIANT, num_classes=0, in_chans=in_chans).eval()  # fresh final norm: identity
    missing, _ = model.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["norm.bias", "norm.weight"]
    with torch.no_grad():
        feats = model(_x(in_chans))
        mask = torch.zeros(2, 4, dtype=torch.bool)
        ref = torch.nn.functional.layer_norm(fc.forward_encoder(_x(in_chans), mask).mean((2, 3)), (32,), eps=1e-6)
    assert float((feats - ref).abs().max()) <= 1e-5  # the dense model is the encoder at mask ratio 0
    return path, feats


def _classifier_export(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    model = _dense(num_classes=5, seed=9)
    path = save_state_dict(tmp_path / "classifier.safetensors", _sd(model), {"image_size": "64"})
    with torch.no_grad():
        return path, model(_x())


def _timm_strict(folder: Path) -> torch.nn.Module:
    """``timm.create_model("local-dir:...", pretrained=True)``, then the folder's weights again with strict=True."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model


@pytest.mark.parametrize("in_chans", [3, 1])
def test_fcmae_export_to_timm_folder(tmp_path, capsys, in_chans):
    src, feats = _fcmae_export(tmp_path, in_chans)
    out = _convert(capsys, src, f"{tmp_path / 'timm_enc'}/", "--to", "timm")
    assert "identity LayerNorm" in out and 'timm.create_model("local-dir:' in out
    config = json.loads((tmp_path / "timm_enc" / "config.json").read_text())
    assert config["num_classes"] == 0 and config["pretrained_cfg"]["input_size"] == [in_chans, 64, 64]
    timm_model = _timm_strict(tmp_path / "timm_enc")
    assert timm_model.num_classes == 0
    with torch.no_grad():
        got = timm_model(_x(in_chans))
    assert got.shape == feats.shape == (2, 32) and feats.std() > 0.5
    assert float((got - feats).abs().max()) <= 1e-4


def test_classifier_to_timm_folder_and_file(tmp_path, capsys):
    src, logits = _classifier_export(tmp_path)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "README.md").write_text("kept\n")
    _convert(capsys, src, tmp_path / "existing", "--to", "timm")  # an existing folder, no trailing slash
    assert sorted(p.name for p in (tmp_path / "existing").iterdir()) == ["README.md", "config.json",
                                                                         "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    timm_model = _timm_strict(tmp_path / "existing")
    with torch.no_grad():
        got = timm_model(_x())
    assert got.shape == logits.shape == (2, 5) and float((got - logits).abs().max()) <= 1e-4
    # the single-file timm output still exists and loads strictly into the same architecture
    _convert(capsys, src, tmp_path / "clf_timm.safetensors", "--to", "timm")
    timm_model.load_state_dict(load_state_dict_file(tmp_path / "clf_timm.safetensors")[0], strict=True)


def _hf_load(cls_name: str, folder: Path) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    model, info = getattr(transformers, cls_name).from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_exports_to_transformers(tmp_path, capsys):
    pytest.importorskip("transformers")
    src, feats = _fcmae_export(tmp_path, 3)
    out = _convert(capsys, src, tmp_path / "hf_enc", "--to", "transformers")
    assert "ConvNextV2Model.from_pretrained" in out
    with torch.no_grad():
        pooled = _hf_load("ConvNextV2Model", tmp_path / "hf_enc")(pixel_values=_x()).pooler_output
    assert float((pooled - feats).abs().max()) <= 1e-4
    src, logits = _classifier_export(tmp_path)
    _convert(capsys, src, tmp_path / "hf_clf", "--to", "transformers")
    with torch.no_grad():
        got = _hf_load("ConvNextV2ForImageClassification", tmp_path / "hf_clf")(pixel_values=_x()).logits
    assert float((got - logits).abs().max()) <= 1e-4
    # and back: a Hugging Face folder is an input like any other
    out = _convert(capsys, tmp_path / "hf_clf", tmp_path / "back.safetensors")
    assert "recognised: transformers" in out
    _assert_equal_sd(load_state_dict_file(tmp_path / "back.safetensors")[0], load_state_dict_file(src)[0])


def test_transformers_missing_gives_install_hint(tmp_path, capsys, monkeypatch):
    src, _ = _classifier_export(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "transformers"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'fcmae[interop]'" in err
    assert not (tmp_path / "hf").exists()


def test_failed_folder_export_writes_nothing(tmp_path, capsys):
    src, _ = _classifier_export(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", str(src), f"{tmp_path / 'timm_out'}/", "--to", "timm", "--model", "atto"]) == 1
    assert "expected (40, 3, 4, 4), found (8, 3, 4, 4)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    for argv, message in [([f"{tmp_path / 'dense_dir'}/"], "writes one file"),
                          ([str(tmp_path / "hf.safetensors"), "--to", "transformers"], "writes a folder")]:
        assert main(["convert", str(src), *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    def broken(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_folder(tmp_path / "half", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
