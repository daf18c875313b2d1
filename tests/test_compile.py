"""The step where users run it: torch.compile equals eager (aot_eager: fast to compile on a CPU), no graph break in
the FCMAE forward, per-shape constants cached, the optimizer set-up that CUDA-graph capture tolerates."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import fcmae.models.sparse as sparse
from fcmae.config import ConfigError, FinetuneConfig, OptimConfig, PretrainConfig, load_config
from fcmae.models.fcmae import create_fcmae
from fcmae.models.masking import check_on_device, random_masking
from fcmae.train.finetuning import build_ema
from fcmae.train.pretraining import run_pretraining
from fcmae.train.trainer import build_optimizer, compile_model, set_lr
from fcmae.weights.loader import create_model
from tests.conftest import randomize_

BACKEND = "aot_eager"  # the graph capture and autograd split of inductor, without its code generation


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _worst_grad(ours: torch.nn.Module, ref: torch.nn.Module) -> float:
    worst = 0.0
    for (name, p), (name_r, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert name == name_r and (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            worst = max(worst, _rel(p.grad, q.grad))
    return worst


def _fcmae() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(create_fcmae("convnextv2_test", decoder_embed_dim=32), scale=0.05)


def test_fcmae_forward_has_no_graph_break():
    # check_on_device queues its check (torch._assert_async) while compiling, also on the CPU: no host read
    model = _fcmae()
    mask = random_masking(2, 2, 0.5, generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64), mask, num_keep=2)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_fcmae_step_equals_eager():
    eager = _fcmae()
    compiled = compile_model(copy.deepcopy(eager), "default", BACKEND)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # in place: the same parameter names
    imgs = torch.randn(3, 3, 64, 64)
    for seed in (0, 1):  # a second mask: the same graph, no recompilation needed for new values
        mask = random_masking(3, 2, 0.5, generator=torch.Generator().manual_seed(seed))
        losses = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            loss = m(imgs, mask, num_keep=2)["loss"]
            loss.backward()
            losses.append(loss.detach())
        assert _rel(losses[1], losses[0]) <= 1e-5
        assert _worst_grad(compiled, eager) <= 1e-5


def test_compiled_mask_check_still_refuses_a_wrong_count():
    compiled = compile_model(_fcmae(), "default", BACKEND)
    bad = random_masking(2, 2, 0.25, generator=torch.Generator().manual_seed(0))  # keeps 3 of 4 cells
    with pytest.raises(RuntimeError, match="must keep 2 of 4 cells"):
        compiled(torch.randn(2, 3, 64, 64), bad, num_keep=2)
    with pytest.raises(ValueError, match="always"):  # eager CPU: still a ValueError at once
        check_on_device(torch.tensor(False), "always")


def test_compiled_dense_finetune_step_equals_eager():
    torch.manual_seed(0)
    eager = randomize_(create_model("convnextv2_test", num_classes=5), scale=0.05)
    compiled = compile_model(copy.deepcopy(eager), "default", BACKEND)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 4])
    losses = [F.cross_entropy(m(x), y) for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert _rel(losses[1].detach(), losses[0].detach()) <= 1e-5
    assert _worst_grad(compiled, eager) <= 1e-5


def test_ema_of_a_compiled_model_runs_its_own_weights():
    model = compile_model(create_model("convnextv2_test", num_classes=3), "default", BACKEND)
    ema = build_ema(model, FinetuneConfig().ema)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the live model moves on; the EMA copy must not follow
    plain = create_model("convnextv2_test", num_classes=3).eval()
    plain.load_state_dict(ema.module.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ema.module.eval()(x), plain(x))


def test_morton_tables_are_cached_per_device_and_unchanged():
    a = sparse.morton_decode(3)
    assert sparse.morton_decode(3) is a  # the same tensors: built once
    row, col = sparse._morton_tables(3, None)
    assert torch.equal(a[0], row) and torch.equal(a[1], col)
    # rows 0..7 x cols 0..7: every position exactly once, and the Z order of a 2x2 block first
    assert sorted((row * 8 + col).tolist()) == list(range(64))
    assert (row[:4].tolist(), col[:4].tolist()) == ([0, 0, 1, 1], [0, 1, 0, 1])
    with torch.inference_mode():
        sparse._MORTON.clear()
        sparse.morton_decode(2)
    assert not sparse.morton_decode(2)[0].is_inference()  # usable by a later training forward


def test_optimizer_is_plain_on_cpu_and_fused_with_tensor_lrs_when_asked():
    groups = lambda m: [{"params": [m.weight], "lr_scale": 0.5}, {"params": [m.bias], "weight_decay": 0.0}]  # noqa
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    plain = build_optimizer(groups(a), OptimConfig(), torch.device("cpu"))
    fused = build_optimizer(groups(b), OptimConfig(), torch.device("cpu"), fused=True)
    assert all(isinstance(g["lr"], float) for g in plain.param_groups)  # CPU numerics exactly as before
    lr_tensors = [g["lr"] for g in fused.param_groups]
    assert all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in lr_tensors)
    assert lr_tensors[0] is not lr_tensors[1]
    x = torch.randn(5, 4)
    for step in range(3):
        for opt, m in ((plain, a), (fused, b)):
            for g in opt.param_groups:
                set_lr(g, 1e-2 * (step + 1) * g.get("lr_scale", 1.0))
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert [g["lr"] for g in fused.param_groups] == lr_tensors  # the same tensors, filled in place
    assert float(lr_tensors[0]) == pytest.approx(1.5e-2)
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)


def test_compile_config_values():
    base = ["model.name=convnextv2_test", "data.source=demo"]
    assert load_config(PretrainConfig, None, base).run.compile == "no"
    cfg = load_config(PretrainConfig, None, [*base, "run.compile=reduce-overhead"])
    assert (cfg.run.compile, cfg.run.compile_backend) == ("reduce-overhead", "inductor")
    with pytest.raises(ConfigError, match="run.compile"):
        load_config(PretrainConfig, None, [*base, "run.compile=fast"])
    with pytest.raises(ConfigError, match="needs run.compile_backend=inductor"):
        load_config(PretrainConfig, None, [*base, "run.compile=max-autotune", "run.compile_backend=aot_eager"])


@pytest.mark.slow
def test_compiled_pretraining_run_equals_eager(tmp_path):
    def run(out, *extra):
        cfg = load_config(PretrainConfig, None, [
            "model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
            "data.input_size=64", "data.limit=8", "data.num_workers=0", "optim.lr=1e-3", "optim.steps=3",
            "optim.warmup_steps=1", "run.batch_size=4", "run.log_every=1", "run.export_every_epochs=0",
            "run.num_vis_images=2", "run.progress=false", "run.threads=1", "run.mixed_precision=no",
            f"run.output_dir={out}", *extra])
        run_pretraining(cfg)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("type") == "train"]
        return losses, load_file(out / "encoder.safetensors")

    losses_e, enc_e = run(tmp_path / "eager")
    losses_c, enc_c = run(tmp_path / "compiled", "run.compile=default", f"run.compile_backend={BACKEND}")
    assert len(losses_c) == len(losses_e) == 3
    assert losses_c == pytest.approx(losses_e, rel=1e-5)
    assert sorted(enc_c) == sorted(enc_e)  # the export's names are the plain model's
    for k in enc_e:
        torch.testing.assert_close(enc_c[k], enc_e[k], rtol=1e-4, atol=1e-6)
