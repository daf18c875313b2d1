"""The GPU suite: exactness, a synchronisation-free step, throughput and decode speed, sized for < 8 min on one H200.

In order, on ``--device`` (default cuda):

1. exactness on the device: sparse vs masked-dense reference (fp32 with TF32 off, and bf16 autocast), per-sample
   GRN (an image alone equals it in a batch), dense ConvNeXt V2 vs timm's;
2. ``torch.cuda.set_sync_debug_mode("error")`` over whole trainer steps (data loader, copies, step; not the steps
   that log or save): any synchronisation raises;
3. training-step images/s and peak memory, bf16 autocast, for ours eager, ours compiled (inductor), the
   masked-dense reference and timm's dense ConvNeXt V2 (the fine-tuning step), per ``--configs`` entry
   (default atto b256, tiny b128, base b64 at 224^2), each side in a fresh process after warm-up, side by side;
4. the input pipeline's GPU JPEG decode (``decode_jpeg_batch``) images/s on ``benchmarks/input_pipeline.py``'s
   photos.

Writes ``OUT/gpu_suite.json`` and ``OUT/gpu_suite.md``. ``--smoke`` runs the same code on the CPU in seconds
(``convnextv2_test``, 64^2 images, 2 steps, fp32, compiled with aot_eager).

    python benchmarks/gpu_suite.py --out results/h200
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, peak_rss_mib, run_isolated

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


# --------------------------------------------------------------------------------------------- 3. throughput
def worker(impl: str, variant: str, batch: int, size: int, steps: int, device: str, backend: str) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    from fcmae.config import OptimConfig
    from fcmae.models.fcmae import create_fcmae
    from fcmae.models.masking import num_kept, random_masking
    from fcmae.models.reference import create_reference_fcmae
    from fcmae.train.trainer import build_optimizer, compile_model

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    if impl == "timm-dense":
        model = timm.create_model(variant if timm.is_model(variant) else "convnextv2_atto", num_classes=1000)
    else:
        model = (create_reference_fcmae if impl == "masked-dense" else create_fcmae)(variant)
    model = model.to(dev).train()
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
            if impl == "timm-dense":
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


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for item in args.configs.split(","):
        variant, batch = item.split(":")
        for impl in IMPLS:
            r = run_isolated(Path(__file__).resolve(), [impl, variant, batch, str(args.size), str(args.steps),
                                                        args.device, args.compile_backend], args.threads)
            rows.append({"variant": variant, "batch": int(batch), "size": args.size, "impl": impl, **r})
            print(f"{variant} b{batch} {impl}: {r['img_s']:.1f} img/s, peak {r['peak_mib']:.0f} MiB", file=sys.stderr)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant, batch in dict.fromkeys((r["variant"], r["batch"]) for r in rows):
        side = {r["impl"]: r for r in rows if (r["variant"], r["batch"]) == (variant, batch)}
        out.append({"variant": variant, "batch": batch,
                    "ours_vs_masked_dense": side["ours"]["img_s"] / side["masked-dense"]["img_s"],
                    "compiled_vs_eager": side["ours-compiled"]["img_s"] / side["ours"]["img_s"],
                    "ours_vs_timm_dense": side["ours"]["img_s"] / side["timm-dense"]["img_s"]})
    return out


# --------------------------------------------------------------------------------------------- 4. decode
def decode_speed(device: str, n: int, rounds: int = 3) -> dict[str, Any]:
    import torch

    from fcmae.data.decode import decode_jpeg_batch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from input_pipeline import make_images

    with tempfile.TemporaryDirectory() as tmp:
        datas = [p.read_bytes() for p in make_images(Path(tmp), n)]
    best = float("inf")
    for _ in range(rounds + 1):  # the first call warms nvJPEG up
        t0 = time.perf_counter()
        out = decode_jpeg_batch(datas, 3, device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"images": n, "img_s": n / best, "device": str(out[0].device)}


# --------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    lines = [f"# GPU suite: {res['device_name']} (torch {res['torch']}){' — smoke' if res['smoke'] else ''}", "",
             "## Exactness", "", "| check | value | limit | ok |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['value']:.2e} | {v['limit']:.0e} | {v['ok']} |" for k, v in res["exactness"].items()]
    s = res["sync_free"]
    lines += ["", f"## Synchronisation in the trainer step: checked {s['checked']}, ok {s['ok']}, steps "
              f"{s['steps_guarded']}, error {s['error']}", "", f"## Training step, {res['size']}^2, "
              f"{res['dtype']}, images/s (peak MiB)", "",
              "| variant | batch | ours eager | ours compiled | masked-dense | timm dense (fine-tune) "
              "| ours / masked-dense | compiled / eager |", "|---|---|---|---|---|---|---|---|"]
    for q in res["ratios"]:
        side = {r["impl"]: r for r in res["throughput"] if (r["variant"], r["batch"]) == (q["variant"], q["batch"])}
        cells = " | ".join(f"{side[i]['img_s']:.1f} ({side[i]['peak_mib']:.0f})" for i in IMPLS)
        lines.append(f"| {q['variant']} | {q['batch']} | {cells} | {q['ours_vs_masked_dense']:.2f}x | "
                     f"{q['compiled_vs_eager']:.2f}x |")
    d = res["decode"]
    lines += ["", f"## GPU JPEG decode: {d['img_s']:.0f} images/s ({d['images']} images on {d['device']})", "",
              f"Goals: ours >= {GOALS['ours_vs_masked_dense_min']:g}x masked-dense per variant; base >= "
              f"{GOALS['base_img_s_min_h200']:,.0f} images/s on one H200; no synchronisation in the step.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", required=False, default="gpu_suite_out")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="convnextv2_atto:256,convnextv2_tiny:128,convnextv2_base:64",
                    help="variant:batch,... (batches adjustable)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side (after 3 warm-up steps)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--decode-images", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="CPU, convnextv2_test, 64^2, 2 steps, aot_eager")
    args = ap.parse_args()
    if args.worker is not None:
        impl, variant, batch, size, steps, device, backend = args.worker
        print(json.dumps(worker(impl, variant, int(batch), int(size), int(steps), device, backend)))
        return
    if args.smoke:
        args.device, args.configs, args.size, args.steps = "cpu", "convnextv2_test:2", 64, 2
        args.compile_backend, args.threads, args.decode_images = "aot_eager", 1, 4
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(args.device).type == "cuda"
    res: dict[str, Any] = {
        "smoke": args.smoke, "device": args.device, "torch": torch.__version__, "size": args.size,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "dtype": "bf16" if cuda else "fp32", "goals": GOALS, "root": str(ROOT)}
    t0 = time.perf_counter()
    res["exactness"] = exactness(args.device, 64 if args.smoke else 224)
    with tempfile.TemporaryDirectory() as tmp:
        res["sync_free"] = sync_free(args.device, Path(tmp) / "run", 4 if args.smoke else 8)
    res["throughput"] = throughput(args)
    res["ratios"] = ratios(res["throughput"])
    res["decode"] = decode_speed(args.device, args.decode_images)
    res["seconds"] = time.perf_counter() - t0
    (out / "gpu_suite.json").write_text(json.dumps(res, indent=1))
    (out / "gpu_suite.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
