"""The GPU suite, made for one call on a lent GPU (~10 minutes with start-up): it cannot come back empty.

Sections, most important first, each in a fresh process under its own timeout (3x its estimate, at least 60 s, never
past the budget); a section that fails or hangs becomes a row (``failed`` / ``timeout``) and the next one runs.
``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md`` are rewritten after every section. ``--budget-s`` (default 360 s)
bounds the whole run: sections that no longer fit are rows marked ``skipped``. The plan is printed first, with each
section's estimate (FLOPs of its step, counted on fake CUDA tensors, at an assumed effective rate, plus process
start-up; see ``START_S``).

1. exactness on the device: sparse vs masked-dense reference (fp32 with TF32 off, and bf16 autocast), per-sample
   GRN, dense ConvNeXt V2 vs timm's;
2. ``torch.cuda.set_sync_debug_mode("error")`` over whole trainer steps (not the steps that log or save);
3. training-step images/s and peak memory, bf16 autocast, first ``--configs`` entry (default base b64 at 224^2):
   ours, the masked-dense reference, ours with activation checkpointing, the dense fine-tuning step with and without
   checkpointing, timm's dense ConvNeXt V2; then ours and the reference for the other entries;
4. the GPU JPEG decode (``decode_jpeg_batch``) images/s on JPEGs made with Pillow;
5. the compiled step (inductor: a cold compile, the costliest row, so last).

Needs only the base install (timm, torchvision); what is missing is reported, not required. ``--smoke`` runs the same
code on the CPU in about a minute (``convnextv2_test``, 64^2 images, 2 steps, fp32, aot_eager).

    python benchmarks/gpu_suite.py --out results/h200
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, peak_rss_mib

from fcmae.runtime import tuned_env

IMPLS = ("ours", "ours-compiled", "masked-dense", "timm-dense")
GOALS = {"ours_vs_masked_dense_min": 3.0, "base_img_s_min_h200": 1500.0, "sync_free": True}


# --------------------------------------------------------------------------------------------- 1. exactness
def _rel(a, b) -> float:
    return float(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).detach())


def exactness(device: str, size: int) -> dict[str, dict[str, Any]]:
    import timm
    import torch

    from fcmae.models.fcmae import create_fcmae
    from fcmae.models.masking import random_masking
    from fcmae.models.reference import create_reference_fcmae
    from fcmae.weights.layouts import dense_to_timm
    from fcmae.weights.loader import create_model

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    name, n, grid = "convnextv2_atto", 4, size // 32
    ours = create_fcmae(name).to(device)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = create_reference_fcmae(name).to(device)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(n, 3, size, size, device=device)
    mask = random_masking(n, grid, 0.6, generator=torch.Generator().manual_seed(0)).to(device)
    checks: dict[str, dict[str, Any]] = {}

    def check(key: str, value: float, limit: float) -> None:
        checks[key] = {"value": value, "limit": limit, "ok": value <= limit}

    la, lb = ours(x, mask)["loss"], ref(x, mask)["loss"]
    la.backward()
    lb.backward()
    check("sparse_vs_masked_dense_fp32_loss", _rel(la, lb), 1e-4)
    refp = dict(ref.named_parameters())
    check("sparse_vs_masked_dense_fp32_grad", max(_rel(p.grad, refp[k].grad) for k, p in ours.named_parameters()),
          1e-3)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        la16, lb16 = ours(x, mask)["loss"], ref(x, mask)["loss"]
    check("sparse_vs_masked_dense_bf16_loss", _rel(la16, lb16), 3e-2)
    with torch.no_grad():
        alone = ours.forward_encoder(x[:1], mask[:1])
        batch = ours.forward_encoder(x, mask)[:1]
    check("per_sample_grn", _rel(alone, batch), 1e-5)
    dense = create_model(name, num_classes=10).to(device).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    theirs = timm.create_model(name, pretrained=False, num_classes=10).to(device).eval()
    theirs.load_state_dict(dense_to_timm(dense.state_dict(), name))
    with torch.no_grad():
        check("dense_vs_timm_logits", _rel(dense(x), theirs(x)), 1e-4)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return checks


# --------------------------------------------------------------------------------------------- 2. sync-free step
def sync_free(device: str, out: Path, steps: int) -> dict[str, Any]:
    """Trainer steps 2 .. steps-1 under ``set_sync_debug_mode("error")`` (the first warms up, the last logs)."""
    import torch

    from fcmae.config import PretrainConfig, load_config
    from fcmae.train.pretraining import run_pretraining

    cuda = torch.device(device).type == "cuda"
    size = 224 if cuda else 64
    cfg = load_config(PretrainConfig, None, [
        "model.name=" + ("convnextv2_atto" if cuda else "convnextv2_test"), "model.in_chans=1", "data.source=demo",
        f"data.input_size={size}", "data.limit=" + ("512" if cuda else "16"),
        "data.num_workers=" + ("2" if cuda else "0"), f"optim.steps={steps}",
        "optim.warmup_steps=1", "optim.lr=1e-4", "run.batch_size=" + ("64" if cuda else "2"),
        f"run.log_every={10 * steps}", "run.export_every_epochs=0", "run.num_vis_images=2", "run.progress=false",
        "run.mixed_precision=" + ("bf16" if cuda else "no"), f"run.output_dir={out}", "run.overwrite=true"])
    guarded: list[int] = []

    def guard(ctx) -> None:  # after a step's own work: arm before step 2, disarm before the last (it logs)
        if not cuda:
            return
        torch.cuda.set_sync_debug_mode("error" if ctx.state.step < steps - 1 else "default")
        if ctx.state.step < steps - 1:
            guarded.append(ctx.state.step + 1)

    res: dict[str, Any] = {"checked": cuda, "steps_guarded": guarded, "error": None}
    try:
        run_pretraining(cfg, hooks=[guard])
    except RuntimeError as exc:
        res["error"] = str(exc).splitlines()[0]
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    res["ok"] = res["error"] is None and (bool(guarded) or not cuda)
    return res


# --------------------------------------------------------------------------------------------- 3. training steps
def _model(impl: str, variant: str, grad_ckpt: bool):
    """The model of one step row: FCMAE (ours, compiled or not), the masked-dense reference, or a dense
    classifier (ours: the fine-tuning step; timm's)."""
    import timm

    from fcmae.models.convnextv2 import build_convnextv2
    from fcmae.models.fcmae import create_fcmae
    from fcmae.models.reference import create_reference_fcmae

    if impl == "timm-dense":
        model = timm.create_model(variant if timm.is_model(variant) else "convnextv2_atto", num_classes=1000)
    elif impl == "ours-dense":
        model = build_convnextv2(variant, num_classes=1000)
    else:
        model = (create_reference_fcmae if impl == "masked-dense" else create_fcmae)(variant)
    if grad_ckpt:
        model.set_grad_checkpointing(True)
    return model


def worker(impl: str, variant: str, batch: int, size: int, steps: int, device: str, backend: str,
           grad_ckpt: bool = False) -> dict:
    """Images/s and peak memory of the training step (bf16 autocast on CUDA) after 3 warm-up steps."""
    import torch
    import torch.nn.functional as F

    from fcmae.config import OptimConfig
    from fcmae.models.masking import num_kept, random_masking
    from fcmae.train.trainer import build_optimizer, compile_model

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = _model(impl, variant, grad_ckpt).to(dev).train()
    if impl == "ours-compiled":
        compile_model(model, "default", backend)
    opt = build_optimizer([{"params": list(model.parameters())}], OptimConfig(), dev)
    grid = size // 32
    imgs = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    masks = [random_masking(batch, grid, 0.6, generator=gen).to(dev) for _ in range(4)]
    labels = torch.randint(0, 1000, (batch,), device=dev)
    keep = num_kept(grid * grid, 0.6)
    i = [0]

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            if impl in ("timm-dense", "ours-dense"):
                loss = F.cross_entropy(model(imgs), labels)
            else:
                loss = model(imgs, masks[i[0] % 4], **({} if impl == "masked-dense" else {"num_keep": keep}))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        i[0] += 1

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (compilation included)
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    sec = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else peak_rss_mib()
    return {"img_s": batch / sec, "peak_mib": peak, "warmup_s": warm_s}


def step_gflops(impl: str, variant: str, batch: int, size: int) -> float:
    """GFLOPs of one training step: the forward counted on fake CUDA tensors (no device, no time), times 3 for
    forward + backward (+1 forward with checkpointing is added by the caller)."""
    import warnings

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    import fcmae.models.sparse as sparse
    from fcmae.models.masking import num_kept, random_masking

    sparse._MORTON.clear()  # per-device tables: never mix fake ones into another mode (or a real run)
    with warnings.catch_warnings(), FakeTensorMode(), torch.device("cuda"):
        warnings.simplefilter("ignore")
        model = _model("ours-dense" if impl in ("timm-dense", "ours-dense") else "ours", variant, False)
        x = torch.randn(batch, 3, size, size)
        with FlopCounterMode(display=False) as count:
            if impl in ("timm-dense", "ours-dense"):
                model(x)
            else:  # the masked-dense reference computes the dense encoder: count it as the dense trunk
                g = size // 32
                model(x, random_masking(batch, g, 0.6).to("cuda"), num_keep=num_kept(g * g, 0.6))
        flops = count.get_total_flops()
    sparse._MORTON.clear()
    if impl == "masked-dense":  # it computes the dense encoder on every position
        return step_gflops("ours-dense", variant, batch, size)
    return 3 * flops / 1e9


# --------------------------------------------------------------------------------------------- 4. decode
def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs (quality 90) at ImageNet-like sizes made with Pillow alone (smooth random colour fields with
    noise: photo-like entropy, no sample photos needed, so the base install suffices)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = ((500, 375), (375, 500))[i % 2]
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        a = np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode_speed(device: str, n: int, rounds: int = 3) -> dict[str, Any]:
    import torch

    from fcmae.data.decode import decode_jpeg_batch

    datas = _jpegs(n)
    best = float("inf")
    for _ in range(rounds + 1):  # the first call warms nvJPEG up
        t0 = time.perf_counter()
        out = decode_jpeg_batch(datas, 3, device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"images": n, "img_s": n / best, "device": str(out[0].device)}


# --------------------------------------------------------------------------------------------- the plan
# what a section's GPU time is made of: a fresh process (torch import, CUDA context, model build, warm-up) and its
# steps at an effective bf16 rate. Assumed for an H200, not measured there (no GPU has run this yet): ~15 s per
# process start, 150 TFLOP/s effective for these convolution nets (~15 % of the H200's dense bf16 peak), ~90 s for a
# cold inductor compile of forward and backward. The first GPU run's measured seconds replace these guesses.
START_S, EFFECTIVE_TFLOPS, COMPILE_S = 15.0, 150.0, 90.0


@dataclass
class Section:
    """One unit of the suite, run in its own process under its own timeout. ``kind``: exactness | sync | step |
    decode | fail | hang (the last two are injected by ``--inject-fault``, for the suite's own test)."""

    key: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    est_s: float = 0.0


def _step_section(impl: str, variant: str, batch: int, args: argparse.Namespace, grad_ckpt: bool = False
                  ) -> Section:
    p = {"impl": impl, "variant": variant, "batch": batch, "size": args.size, "steps": args.steps,
         "device": args.device, "backend": args.compile_backend, "grad_ckpt": grad_ckpt}
    try:
        gflops = step_gflops(impl, variant, batch, args.size) * (4 / 3 if grad_ckpt else 1.0)
    except Exception as exc:  # an estimate must never stop the suite: a flat guess instead
        print(f"no FLOP count for {impl} {variant}: {type(exc).__name__}", file=sys.stderr)
        gflops = 3e3
    est = START_S + (3 + args.steps) * gflops / (EFFECTIVE_TFLOPS * 1e3) + (COMPILE_S if "compiled" in impl else 0)
    key = f"step {variant} b{batch} {impl}{' +ckpt' if grad_ckpt else ''}"
    return Section(key, "step", p, round(est, 1))


def plan(args: argparse.Namespace) -> list[Section]:
    """The sections, most important first: exactness, the sync check, the base pretraining step and its speed-up
    over the masked-dense reference, activation checkpointing's time and memory (pretraining and fine-tuning),
    the other variants, decode, then the compiled step (a cold compile is the costliest row)."""
    cfgs = [(v, int(b)) for v, b in (item.split(":") for item in args.configs.split(","))]
    first_v, first_b = cfgs[0]
    secs = [Section("exactness", "exactness", {"device": args.device, "size": 64 if args.smoke else 224}, 25.0),
            Section("sync-free step", "sync", {"device": args.device, "steps": 4 if args.smoke else 8}, 45.0)]
    if args.inject_fault:
        secs += [Section("injected failure", "fail", {}, 1.0), Section("injected hang", "hang", {}, 1.0)]
    secs += [_step_section("ours", first_v, first_b, args), _step_section("masked-dense", first_v, first_b, args),
             _step_section("ours", first_v, first_b, args, grad_ckpt=True),
             _step_section("ours-dense", first_v, first_b, args),
             _step_section("ours-dense", first_v, first_b, args, grad_ckpt=True),
             _step_section("timm-dense", first_v, first_b, args)]
    for v, b in cfgs[1:]:
        secs += [_step_section("ours", v, b, args), _step_section("masked-dense", v, b, args)]
    secs.append(Section("gpu jpeg decode", "decode", {"device": args.device, "n": args.decode_images}, 20.0))
    secs.append(_step_section("ours-compiled", *cfgs[-1], args))
    return secs


def run_section(sec: Section) -> dict[str, Any]:
    """The section's work (in the worker process)."""
    p = sec.params
    if sec.kind == "exactness":
        return {"checks": exactness(p["device"], p["size"])}
    if sec.kind == "sync":
        with tempfile.TemporaryDirectory() as tmp:
            return sync_free(p["device"], Path(tmp) / "run", p["steps"])
    if sec.kind == "step":
        return worker(p["impl"], p["variant"], p["batch"], p["size"], p["steps"], p["device"], p["backend"],
                      p["grad_ckpt"])
    if sec.kind == "decode":
        return decode_speed(p["device"], p["n"])
    if sec.kind == "fail":
        raise RuntimeError("injected failure (--inject-fault)")
    if sec.kind == "hang":
        while True:
            time.sleep(1)
    raise ValueError(f"unknown section kind {sec.kind}")


def _launch(sec: Section, timeout: float, threads: int) -> dict[str, Any]:
    """Run one section in a fresh process with a timeout; a failure or a timeout is a row, never an exception."""
    env = tuned_env()
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", json.dumps(asdict(sec))]
    t0 = time.perf_counter()
    row: dict[str, Any] = {"section": sec.key, "kind": sec.kind, "est_s": sec.est_s, "timeout_s": round(timeout, 1)}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "seconds": round(time.perf_counter() - t0, 1),
                "error": f"no result within {timeout:.0f} s (killed)"}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        last = [x for x in proc.stderr.strip().splitlines() if x.strip()][-1:] or [f"exit {proc.returncode}"]
        return {**row, "status": "failed", "error": last[0][:300]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = all(c["ok"] for c in result["checks"].values()) if sec.kind == "exactness" else result.get("ok", True)
    return {**row, "status": "ok" if ok else "check failed", "result": result}


def missing_packages() -> list[str]:
    """Packages a section would use that are not installed (reported, never required)."""
    import importlib.util

    return [name for name in ("timm", "torchvision") if importlib.util.find_spec(name) is None]


# --------------------------------------------------------------------------------------------- report
def _row_md(r: dict[str, Any]) -> str:
    res = r.get("result") or {}
    if r["kind"] == "step" and "img_s" in res:
        what = f"{res['img_s']:.1f} img/s, peak {res['peak_mib']:.0f} MiB, warm-up {res['warmup_s']:.1f} s"
    elif r["kind"] == "exactness" and "checks" in res:
        what = ", ".join(f"{k} {v['value']:.1e}{'' if v['ok'] else ' FAIL'}" for k, v in res["checks"].items())
    elif r["kind"] == "decode" and "img_s" in res:
        what = f"{res['img_s']:.0f} images/s ({res['images']} on {res['device']})"
    elif r["kind"] == "sync" and res:
        what = f"checked {res['checked']}, steps {res['steps_guarded']}, error {res['error']}"
    else:
        what = r.get("error", "")
    return f"| {r['section']} | {r['status']} | {r.get('seconds', 0):.1f} | {r['est_s']:.0f} | {what} |"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# GPU suite: {res['device_name']} (torch {res['torch']}){' — smoke' if res['smoke'] else ''}", "",
             f"Budget {res['budget_s']:.0f} s, used {res['seconds']:.0f} s; missing packages: "
             f"{', '.join(res['missing']) or 'none'}", "",
             "| section | status | seconds | estimate s | result |", "|---|---|---|---|---|"]
    lines += [_row_md(r) for r in res["rows"]]
    steps = {r["section"]: r["result"] for r in res["rows"] if r["kind"] == "step" and r["status"] == "ok"}
    for key, res_ in steps.items():
        if key.endswith(" ours") and key.replace(" ours", " masked-dense") in steps:
            ratio = res_["img_s"] / steps[key.replace(" ours", " masked-dense")]["img_s"]
            lines.append(f"\n{key}: {ratio:.2f}x the masked-dense reference (goal >= "
                         f"{GOALS['ours_vs_masked_dense_min']:g}x)")
        if key + " +ckpt" in steps:
            on = steps[key + " +ckpt"]
            lines.append(f"\n{key} with activation checkpointing: {on['img_s'] / res_['img_s']:.2f}x the images/s, "
                         f"{on['peak_mib'] / res_['peak_mib']:.2f}x the peak memory")
    return "\n".join(lines) + "\n"


def _write(out: Path, res: dict[str, Any]) -> None:
    """JSON and markdown after every section (atomic replace: a kill never leaves half a file)."""
    for name, text in (("gpu_suite.json", json.dumps(res, indent=1)), ("gpu_suite.md", markdown(res))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def run_plan(args: argparse.Namespace, secs: list[Section], res: dict[str, Any], out: Path, t0: float) -> None:
    """Every section in order under ``min(its timeout, the budget left)``; those that cannot start are rows too.
    ``t0``: when the run started (the budget covers planning and writing too)."""
    for sec in secs:
        left = args.budget_s - 5.0 - (time.perf_counter() - t0)  # 5 s for the last write and the report
        if left < min(sec.est_s, 5.0):
            row = {"section": sec.key, "kind": sec.kind, "est_s": sec.est_s, "status": "skipped",
                   "error": f"budget spent ({left:.0f} s left)"}
        else:
            row = _launch(sec, min(max(args.section_timeout_factor * sec.est_s, args.min_timeout_s), left),
                          args.threads)
        res["rows"].append(row)
        res["seconds"] = time.perf_counter() - t0
        _write(out, res)
        print(_row_md(row), file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="gpu_suite_out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="convnextv2_base:64,convnextv2_atto:256",
                    help="variant:batch,... the first gets every row (checkpointing, fine-tuning, timm)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (after 3 warm-up steps)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--decode-images", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=360.0, help="the whole run; later sections are skipped")
    ap.add_argument("--section-timeout-factor", type=float, default=3.0, help="a section's timeout: x its estimate")
    ap.add_argument("--min-timeout-s", type=float, default=60.0)
    ap.add_argument("--inject-fault", action="store_true", help=argparse.SUPPRESS)  # a failing and a hanging section
    ap.add_argument("--smoke", action="store_true", help="CPU, convnextv2_test, 64^2, 2 steps, aot_eager")
    args = ap.parse_args()
    if args.section is not None:
        d = json.loads(args.section)
        print(json.dumps(run_section(Section(**d))))
        return
    if args.smoke:
        args.device, args.configs, args.size, args.steps = "cpu", "convnextv2_test:2", 64, 2
        args.compile_backend, args.threads, args.decode_images = "aot_eager", 1, 4
    t0 = time.perf_counter()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(args.device).type == "cuda"
    secs = plan(args)
    res: dict[str, Any] = {
        "smoke": args.smoke, "device": args.device, "torch": torch.__version__, "budget_s": args.budget_s,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dtype": "bf16" if cuda else "fp32", "goals": GOALS, "root": str(ROOT), "missing": missing_packages(),
        "plan": [asdict(s) for s in secs], "plan_est_s": round(sum(s.est_s for s in secs), 1), "rows": [],
        "seconds": 0.0}
    print(f"plan ({res['plan_est_s']:.0f} s estimated, budget {args.budget_s:.0f} s):", file=sys.stderr)
    for s in secs:
        print(f"  {s.est_s:6.0f} s  {s.key}", file=sys.stderr)
    try:
        run_plan(args, secs, res, out, t0)
    finally:
        _write(out, res)
    print(markdown(res))


if __name__ == "__main__":
    main()
