"""Config system: every shipped YAML loads; overrides; typos and bad values rejected with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fcmae.config import ConfigError, PretrainConfig, load_config, save_config, to_dict

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("pretrain/*.yaml")) + [ROOT / "configs/demo.yaml"],
                         ids=lambda p: p.name)
def test_every_pretrain_yaml_loads(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.model.name.startswith("convnextv2_")
    if path.parent.name == "pretrain":
        assert cfg.model.name == path.stem
        # the paper's recipe
        assert cfg.optim.blr == 1.5e-4 and cfg.optim.warmup_epochs == 40
        # official TRAINING.md: base 1600 epochs, the others 800
        assert cfg.optim.epochs == (1600 if path.stem == "convnextv2_base" else 800)
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
        assert cfg.model.mask_ratio == 0.6 and cfg.model.norm_pix_loss and cfg.data.crop_scale == (0.2, 1.0)
        assert cfg.run.batch_size * 8 * cfg.run.accum_iter == 4096


def test_overrides_apply_after_yaml():
    cfg = load_config(PretrainConfig, ROOT / "configs/demo.yaml",
                      ["optim.blr=2e-4", "run.batch_size=8", "data.crop_scale=[0.3,0.9]", "optim.clip_grad=1.0",
                       "optim.lr=null", "model.norm_pix_loss=false"])
    assert cfg.optim.blr == 2e-4 and cfg.run.batch_size == 8 and cfg.data.crop_scale == (0.3, 0.9)
    assert cfg.optim.clip_grad == 1.0 and cfg.optim.lr is None and cfg.model.norm_pix_loss is False


@pytest.mark.parametrize("override,needle", [
    ("optim.blrr=1", "optim.blrr"),
    ("modle.name=x", "modle"),
    ("run.batch_size=abc", "run.batch_size"),
    ("run.batch_size=0", "run.batch_size"),
    ("run.mixed_precision=fp8", "run.mixed_precision"),
    ("model.name=convnextv2_giant", "model.name"),
    ("data.input_size=100", "data.input_size"),
    ("model.mask_ratio=1.0", "model.mask_ratio"),
    ("model.norm_pix_loss=maybe", "model.norm_pix_loss"),
    ("data.crop_scale=[0.5]", "data.crop_scale"),
    ("noequals", "key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        load_config(PretrainConfig, ROOT / "configs/demo.yaml", [override])


def test_typo_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.weight_decy"):
        load_config(PretrainConfig, p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")


def test_merged_config_roundtrips(tmp_path):
    cfg = load_config(PretrainConfig, ROOT / "configs/demo.yaml", ["run.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["run"]["seed"] == 7
