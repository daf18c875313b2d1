"""The built wheel ships the YAML configs, so the commands find them by name after a plain ``pip install .``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fcmae.config import PretrainConfig, load_config, packaged_configs, resolve_config_path

ROOT = Path(__file__).resolve().parent.parent


def test_configs_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the clone
    for name in ("demo", "demo.yaml", "configs/demo.yaml", "pretrain/convnextv2_atto", "finetune/fashion_mnist"):
        assert resolve_config_path(name).is_relative_to(packaged_configs())
    assert load_config(PretrainConfig, "demo").data.source == "demo"


@pytest.mark.slow
def test_wheel_contains_every_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("fcmae-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"fcmae/configs/{p.relative_to(ROOT / 'fcmae' / 'configs')}"
               for p in (ROOT / "fcmae" / "configs").rglob("*.yaml")}
    assert len(shipped) >= 18 and shipped <= names, sorted(shipped - names)
    assert "fcmae/assets/fashion_mnist_demo.npz" in names
