"""ConvNeXt V1 in the family: official V1 checkpoints and timm ``convnext_*`` weights in, FCMAE pretraining of a V1
variant out to timm's ``local-dir:``, and the weights-to-variant rules that keep V1 and V2 apart.

The official ConvNeXt V1 file is written here from timm's own model through a mapping spelled out independently of
``fcmae.weights.layouts`` (the official code's names: ``downsample_layers``, ``stages.i.j.{dwconv, norm, pwconv1,
pwconv2, gamma}``, ``norm``, ``head``; Linear MLP weights; ``{"model": ...}`` as its trainer saves it).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import randomize_
from safetensors.torch import load_file

from fcmae import create_model
from fcmae.cli import main
from fcmae.weights.layouts import (
    ConversionError,
    check_against_model,
    detect_layout,
    infer_variant,
    timm_to_dense,
    to_dense,
)
from fcmae.weights.loader import WeightsError, load_encoder

ROOT = Path(__file__).resolve().parent.parent


def official_v1_from_timm(timm_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/ConvNeXt's ``convnext.py`` names for a timm ``convnext_*`` state dict."""
    out = {}
    for key, t in timm_sd.items():
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv.", key)
        key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc([12])\.", r"stages.\1.\2.pwconv\3.", key)
        key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[key] = t.flatten(1) if re.search(r"pwconv[12]\.weight$", key) else t  # nn.Linear in the official code
    return out


def _timm_v1(name: str = "convnext_atto", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(timm.create_model(name, pretrained=False, **kw), scale=0.05, seed=seed).eval()


def _x(in_chans: int = 3) -> torch.Tensor:
    return torch.randn(2, in_chans, 64, 64, generator=torch.Generator().manual_seed(3))


def _convert(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    assert main(["convert", *map(str, argv)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_official_v1_checkpoint_converts_and_gives_timms_logits(tmp_path, capsys):
    theirs = _timm_v1()
    official = official_v1_from_timm(theirs.state_dict())
    assert official["stages.2.5.gamma"].shape == (160,) and official["stages.0.0.pwconv1.weight"].ndim == 2
    path = tmp_path / "convnext_atto_1k_224_ema.pth"
    torch.save({"model": official}, path)
    out = _convert(capsys, path, tmp_path / "ours.safetensors")
    assert "convnext_atto" in out
    ours = create_model("convnext_atto").eval()
    ours.load_state_dict(load_file(str(tmp_path / "ours.safetensors")), strict=True)
    with torch.no_grad():
        want = theirs(_x())
        assert want.abs().max() > 0.1
        torch.testing.assert_close(ours(_x()), want, rtol=1e-5, atol=1e-5)
    # and on to timm's local-dir: the same architecture, strictly, the same logits
    _convert(capsys, path, f"{tmp_path / 'timm_dir'}/", "--to", "timm")
    back = timm.create_model(f"local-dir:{tmp_path / 'timm_dir'}", pretrained=True).eval()
    assert type(back).__name__ == "ConvNeXt" and back.stages[0].blocks[0].gamma is not None
    back.load_state_dict(load_file(str(tmp_path / "timm_dir" / "model.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(_x()), want, rtol=1e-5, atol=1e-5)


def test_v1_weights_name_their_variant_and_refuse_a_v2_model():
    v1 = timm_to_dense(_timm_v1().state_dict())
    assert detect_layout(v1) == "dense"
    assert infer_variant(v1) == "convnext_atto"
    assert check_against_model(v1, "convnext_atto") == "convnext_atto"
    v2 = create_model("convnextv2_atto").state_dict()  # the same depths and widths, GRN blocks
    assert infer_variant(v2) == "convnextv2_atto"
    with pytest.raises(ConversionError, match=r"stages\.0\.0\.gamma unexpected"):
        check_against_model(v1, "convnextv2_atto")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"stages\.0\.0\.gamma"):
        create_model("convnextv2_atto").load_state_dict(v1)
    small = timm_to_dense(timm.create_model("convnext_small", pretrained=False).state_dict())
    assert infer_variant(small) == "convnext_small"  # V1 only: V2 has no small


def test_v1_transformers_export_is_refused_by_name(tmp_path, capsys):
    """Hugging Face's ConvNeXt V1 class is not an export target: a one-line error, nothing written."""
    path = tmp_path / "v1.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in create_model("convnext_test", num_classes=0).state_dict().items()},
              str(path))
    assert main(["convert", str(path), f"{tmp_path / 'hf'}/", "--to", "transformers"]) != 0
    err = capsys.readouterr().err
    assert "ConvNeXt V1" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_v1_fcmae_pretraining_converts_and_loads_strictly_in_timm(tmp_path, capsys):
    """``fcmae pretrain model.name=convnext_atto`` (a few steps) -> encoder -> ``--to timm`` folder -> timm's
    ``convnext_atto`` through ``local-dir:``, strictly, computing our dense encoder's features."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fcmae", "pretrain", "model.name=convnext_atto", "model.decoder_embed_dim=64",
           "model.in_chans=1", "data.source=demo", "data.input_size=64", "data.limit=16", "data.num_workers=0",
           "optim.lr=1e-3", "optim.steps=3", "optim.warmup_steps=1", "run.batch_size=4", "run.progress=false",
           "run.log_every=1", "run.export_every_epochs=0", "run.num_vis_images=2", "run.mixed_precision=no",
           "run.threads=1", f"run.output_dir={out}"]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    enc = load_file(str(out / "encoder.safetensors"))
    assert enc["stages.1.1.gamma"].shape == (80,) and not any(".grn." in k for k in enc)
    assert not torch.allclose(enc["stages.1.1.gamma"], torch.full((80,), 1e-6))  # LayerScale was trained
    ours, info = load_encoder(out / "encoder.safetensors")
    assert info["name"] == "convnext_atto" and ours.in_chans == 1
    _convert(capsys, out / "encoder.safetensors", f"{tmp_path / 'timm_enc'}/", "--to", "timm")
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm_enc'}", pretrained=True).eval()
    theirs.load_state_dict(load_file(str(tmp_path / "timm_enc" / "model.safetensors")), strict=True)
    assert theirs.num_classes == 0 and theirs.stem[0].in_channels == 1
    with torch.no_grad():
        torch.testing.assert_close(theirs(_x(1)), ours(_x(1)), rtol=1e-5, atol=1e-5)


def test_v1_weights_into_a_v2_model_name_the_problem(tmp_path):
    path = tmp_path / "v1.pt"
    torch.save(timm_to_dense(_timm_v1().state_dict()), path)
    with pytest.raises(WeightsError, match="gamma"):
        create_model("convnextv2_atto", pretrained=path)
    model = create_model("convnext_atto", pretrained=path)  # the right family loads
    assert model.stages[3][1].gamma.abs().max() > 0.01
    got, layout = to_dense(torch.load(path, weights_only=True))
    assert layout == "dense" and "stages.3.1.gamma" in got
