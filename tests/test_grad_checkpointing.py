"""Activation checkpointing (``set_grad_checkpointing``, ``run.grad_checkpointing``): the same losses and every
gradient as without it (fp32, <= 1e-6 relative), with drop path on, for the dense model, the sparse FCMAE encoder
and its decoder (both of the decoder's paths); under torch.compile; through a SIGKILL and resume. It must really
drop activations (fewer bytes saved for backward) and keep every parameter name. FSDP: tests/fsdp_run.py."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run_safety import TINY, _restore_threads  # noqa: F401  (the same tiny run; its autouse fixture)

from fcmae.config import TRAINING_KEYS_FREE, PretrainConfig, load_config
from fcmae.models.convnextv2 import build_convnextv2
from fcmae.models.fcmae import create_fcmae
from fcmae.models.masking import random_masking
from fcmae.models.stage import Stage
from fcmae.train.pretraining import run_pretraining
from fcmae.train.trainer import compile_model
from fcmae.weights.checkpoints import find_latest_checkpoint
from tests.conftest import randomize_

ROOT = Path(__file__).resolve().parent.parent
DROP = 0.3  # drop path on every block but the first: the recomputation must draw the same samples


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _run(model: torch.nn.Module, fn, seed: int = 7) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every gradient of ``fn(model)`` with the RNG (drop path) seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain: torch.nn.Module, ckpt: torch.nn.Module, fn, tol: float = 1e-6) -> None:
    loss_p, grads_p = _run(plain, fn)
    loss_c, grads_c = _run(ckpt, fn)
    assert _rel(loss_c, loss_p) <= tol
    assert grads_c.keys() == grads_p.keys() and len(grads_p) == len(list(plain.parameters()))
    worst = max(_rel(grads_c[k], grads_p[k]) for k in grads_p)
    assert worst <= tol, worst
    # the drop path is live: another seed gives another loss (else the test could not see a replay mismatch)
    assert _run(plain, fn, seed=8)[0] != loss_p


def _saved_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of the tensors autograd keeps for backward during ``fn(model)``, parameters aside (the activation
    memory; what a checkpointed block keeps is held by its checkpoint, so only its input is counted, by the op
    before it)."""
    total = 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(model)
    return total


def _pair(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing()
    assert list(ckpt.state_dict()) == list(model.state_dict())
    return model, ckpt


def _dense() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(build_convnextv2("convnextv2_test", num_classes=5, drop_path_rate=DROP), scale=0.05)


def _fcmae(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_fcmae("convnextv2_test", decoder_embed_dim=32, decoder_depth=depth,
                                   drop_path_rate=DROP), scale=0.05)


def test_dense_model_equal_with_checkpointing_and_stores_less():
    x = torch.randn(3, 3, 64, 64)
    labels = torch.tensor([0, 3, 4])

    def fn(m):
        return torch.nn.functional.cross_entropy(m(x), labels)

    plain, ckpt = _pair(_dense())
    assert all(isinstance(s, Stage) and s.grad_checkpointing for s in ckpt.stages)
    _assert_same(plain, ckpt, fn)
    assert _saved_bytes(ckpt, fn) < 0.5 * _saved_bytes(plain, fn)
    ckpt.set_grad_checkpointing(False)
    assert _saved_bytes(ckpt, fn) == _saved_bytes(plain, fn)
    with torch.no_grad():  # no backward to come: nothing is checkpointed, the same outputs
        ckpt.set_grad_checkpointing()
        assert torch.equal(ckpt.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("predict_all", [False, True])  # the decoder's rows path and its whole-grid path
def test_fcmae_encoder_and_decoder_equal_with_checkpointing(predict_all):
    imgs = torch.randn(4, 3, 64, 64)
    mask = random_masking(4, 2, 0.5, generator=torch.Generator().manual_seed(0))

    def fn(m):
        return m(imgs, mask, num_keep=2, predict_all=predict_all)["loss"]

    plain, ckpt = _pair(_fcmae())
    assert ckpt.decoder.grad_checkpointing and all(s.grad_checkpointing for s in ckpt.encoder.stages)
    _assert_same(plain, ckpt, fn)
    # at this tiny width the pixel head and its targets (3072 values per cell, outside the stages) are half of it
    assert _saved_bytes(ckpt, fn) < 0.6 * _saved_bytes(plain, fn)
    # the decoder alone: encoder plain, decoder checkpointed
    dec_only = copy.deepcopy(plain)
    dec_only.decoder.grad_checkpointing = True
    _assert_same(plain, dec_only, fn)


def test_checkpointing_under_compile_equals_eager():
    imgs = torch.randn(3, 3, 64, 64)
    mask = random_masking(3, 2, 0.5, generator=torch.Generator().manual_seed(1))

    def fn(m):
        return m(imgs, mask, num_keep=2)["loss"]

    plain, ckpt = _pair(_fcmae(depth=1))
    compile_model(ckpt, "default", "aot_eager")
    _assert_same(plain, ckpt, fn)
    dense, dense_ckpt = _pair(_dense())
    compile_model(dense_ckpt, "default", "aot_eager")
    x = torch.randn(2, 3, 64, 64)
    _assert_same(dense, dense_ckpt, lambda m: m(x).square().mean())


def test_config_key_is_free_on_resume_and_reaches_the_model():
    assert "run.grad_checkpointing" in TRAINING_KEYS_FREE
    from fcmae.train.pretraining import PretrainRecipe

    cfg = load_config(PretrainConfig, None, [*TINY, "run.grad_checkpointing=true"])
    model = PretrainRecipe(cfg).setup().model
    stages = [m for m in model.modules() if isinstance(m, Stage)]
    assert len(stages) == 5 and all(s.grad_checkpointing for s in stages)  # 4 encoder stages + decoder


@pytest.mark.slow
def test_sigkill_and_resume_with_checkpointing_equal_the_uninterrupted_run(tmp_path):
    """Killed after step 3 with checkpointing on, resumed with it on: the final weights equal an uninterrupted run
    without checkpointing (drop path 0.2 in TINY)."""
    ref = tmp_path / "ref"
    assert run_pretraining(load_config(PretrainConfig, None, [*TINY, f"run.output_dir={ref}"]))["steps"] == 8
    out, on = tmp_path / "run", "run.grad_checkpointing=true"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(ROOT / "tests" / "crash_run.py"), "pretrain", "3", *TINY, f"run.output_dir={out}", on]
    crashed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert find_latest_checkpoint(out / "checkpoints").name == "step_00000002"
    cfg = load_config(PretrainConfig, None, [*TINY, f"run.output_dir={out}", on, "run.resume=auto"])
    assert run_pretraining(cfg)["steps"] == 8
    a, b = (load_file(str(find_latest_checkpoint(d / "checkpoints") / "model.safetensors")) for d in (ref, out))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a) <= 1e-6
