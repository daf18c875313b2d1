"""Builders of the checkpoint files ConvNeXt V2 users hold, and the code-execution check, for any test to reuse.

Facts (official ConvNeXt-V2 repo, its issues #47 and #65, timm's ``checkpoint_filter_fn``):
- released FCMAE weights ``convnextv2_<v>_1k_224_fcmae.pt``: ``{"model": sd}``, dense names and shapes, no
  ``encoder.`` prefix, GRN ``(1, 4C)``, no final norm/head, decoder keys sometimes present;
- the official trainer's ``checkpoint-<epoch>.pth``: ``{"model", "optimizer", "epoch", "scaler", "args"}`` with a
  pickled ``argparse.Namespace`` as ``args``, sometimes ``"model_ema"``; pretraining ``model`` is the
  MinkowskiEngine layout under ``encoder.`` plus the decoder, fine-tuning ``model`` is dense with a head;
- released fine-tuned weights ``convnextv2_<v>_1k_224_ema.pt``: ``{"model": sd}``, dense with head and final
  norm, GRN ``(1, 1, 1, 4C)``.

``assert_refuses_code_running_pickles(run, folder, capsys)`` feeds pickles whose loading would create a file to any
entry point (``fcmae convert``, ``finetune --init``, ``evaluate`` ...) and checks the refusal.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

StateDict = dict[str, torch.Tensor]


# --- official layouts from dense weights --------------------------------------------------------------------------

def minkowski_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense ``(C_out, C_in, k, k)`` -> Minkowski ``(k*k, C_in, C_out)``, offset by offset.

    Written independently of the library's reshapes: offset ``x * k + y`` holds dense position ``(y, x)``
    (MinkowskiEngine enumerates offsets with height and width swapped).
    """
    c_out, c_in, k, _ = weight.shape
    kernel = torch.empty(k * k, c_in, c_out, dtype=weight.dtype)
    for y in range(k):
        for x in range(k):
            kernel[x * k + y] = weight[:, :, y, x].t()
    return kernel


def official_decoder(dim: int = 32, in_dim: int = 32, prefix: str = "") -> StateDict:
    """Official FCMAE decoder keys (1x1 Conv2d proj/pred, (1, D, 1, 1) mask token, dense blocks)."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        f"{prefix}proj.weight": r(dim, in_dim, 1, 1), f"{prefix}proj.bias": r(dim),
        f"{prefix}mask_token": r(1, dim, 1, 1),
        f"{prefix}decoder.0.dwconv.weight": r(dim, 1, 7, 7), f"{prefix}decoder.0.dwconv.bias": r(dim),
        f"{prefix}decoder.0.norm.weight": r(dim), f"{prefix}decoder.0.norm.bias": r(dim),
        f"{prefix}decoder.0.pwconv1.weight": r(4 * dim, dim), f"{prefix}decoder.0.pwconv1.bias": r(4 * dim),
        f"{prefix}decoder.0.grn.gamma": r(1, 1, 1, 4 * dim), f"{prefix}decoder.0.grn.beta": r(1, 1, 1, 4 * dim),
        f"{prefix}decoder.0.pwconv2.weight": r(dim, 4 * dim), f"{prefix}decoder.0.pwconv2.bias": r(dim),
        f"{prefix}pred.weight": r(32 * 32 * 3, dim, 1, 1), f"{prefix}pred.bias": r(32 * 32 * 3),
    }


def _sparse_name(key: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One dense key/tensor -> its MinkowskiEngine name/shape (the stem stays dense)."""
    parts = key.split(".")
    if key.startswith("downsample_layers.0."):
        return key, t
    if key.startswith("downsample_layers."):
        if parts[2] == "0":
            return f"downsample_layers.{parts[1]}.0.ln.{parts[3]}", t
        if parts[3] == "weight":
            return f"downsample_layers.{parts[1]}.1.kernel", minkowski_kernel(t)
        return f"downsample_layers.{parts[1]}.1.bias", t.reshape(1, -1)
    stage, layer, name = ".".join(parts[:3]), parts[3], parts[4]
    if layer == "dwconv":
        if name == "weight":
            return f"{stage}.dwconv.kernel", minkowski_kernel(t)[:, 0, :]
        return f"{stage}.dwconv.bias", t.reshape(1, -1)
    if layer == "norm":
        return f"{stage}.norm.ln.{name}", t
    if layer in ("pwconv1", "pwconv2"):
        return f"{stage}.{layer}.linear.{name}", t
    assert layer == "grn", key
    return key, t.reshape(1, -1)


def to_official_sparse(dense: StateDict) -> StateDict:
    """The official FCMAE pretraining model's state dict: MinkowskiEngine encoder under ``encoder.`` + decoder."""
    out: StateDict = {}
    for key, t in dense.items():
        new, val = _sparse_name(key, t)
        out[f"encoder.{new}"] = val.clone()
    out.update(official_decoder(in_dim=dense["downsample_layers.3.1.weight"].shape[0]))
    return out


def to_official_dense(dense: StateDict, prefix: str = "module.") -> StateDict:
    """Our dense keys with GRN as ``(1, 1, 1, 4C)`` (the official dense code), under ``prefix``."""
    return {prefix + k: (v.reshape(1, 1, 1, -1) if ".grn." in k else v).clone() for k, v in dense.items()}


def released_fcmae_weights(encoder: StateDict, with_decoder: bool) -> dict[str, StateDict]:
    """``convnextv2_<v>_1k_224_fcmae.pt``: ``{"model": dense names, GRN (1, 4C), no prefix}`` (+ decoder keys)."""
    sd = {k: (v.reshape(1, -1) if ".grn." in k else v).clone() for k, v in encoder.items()}
    if with_decoder:
        sd.update(official_decoder(in_dim=encoder["downsample_layers.3.1.weight"].shape[0]))
    return {"model": sd}


def released_finetuned_weights(dense: StateDict) -> dict[str, StateDict]:
    """``convnextv2_<v>_1k_224_ema.pt``: ``{"model": dense with norm and head, GRN (1, 1, 1, 4C)}``."""
    return {"model": to_official_dense(dense, prefix="")}


def official_args(pretrain: bool, model: str = "convnextv2_test", input_size: int = 64) -> argparse.Namespace:
    """The official trainer's parsed command line (a subset of main_pretrain.py / main_finetune.py's options)."""
    p = argparse.ArgumentParser()
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=800 if pretrain else 100)
    p.add_argument("--update_freq", type=int, default=1)
    p.add_argument("--model", default=model)
    p.add_argument("--input_size", type=int, default=input_size)
    p.add_argument("--blr", type=float, default=1.5e-4 if pretrain else 2e-4)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--data_path", default="/datasets01/imagenet_full_size/061417/")
    p.add_argument("--output_dir", default="./output")
    p.add_argument("--resume", default="")
    p.add_argument("--distributed", action="store_true")
    if pretrain:
        p.add_argument("--mask_ratio", type=float, default=0.6)
        p.add_argument("--norm_pix_loss", action="store_true")
        p.add_argument("--decoder_depth", type=int, default=1)
        p.add_argument("--decoder_embed_dim", type=int, default=512)
    else:
        p.add_argument("--layer_decay_type", choices=["single", "group"], default="single")
        p.add_argument("--layer_decay", type=float, default=0.9)
        p.add_argument("--model_ema", type=bool, default=True)
        p.add_argument("--nb_classes", type=int, default=5)
        p.add_argument("--smoothing", type=float, default=0.1)
    return p.parse_args(["--norm_pix_loss"] if pretrain else [])


def _optimizer_state(params: list[torch.Tensor]) -> dict:
    """A real AdamW ``state_dict()`` after one step (tensors per parameter id, param_groups of plain values)."""
    params = [torch.nn.Parameter(p.detach().clone().float()) for p in params]
    opt = torch.optim.AdamW([{"params": params[:2], "weight_decay": 0.0, "lr_scale": 1.0},
                             {"params": params[2:], "weight_decay": 0.05, "lr_scale": 0.5}], lr=1e-3)
    sum((p * p).sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def official_trainer_checkpoint(model: StateDict, args: argparse.Namespace, epoch: int,
                                model_ema: StateDict | None = None) -> dict:
    """``checkpoint-<epoch>.pth`` as the official ``utils.save_model`` writes it."""
    ckpt = {
        "model": model,
        "optimizer": _optimizer_state(list(model.values())[:4]),
        "epoch": epoch,
        # torch.cuda.amp.GradScaler.state_dict() (the official NativeScalerWithGradNormCount)
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 17},
        "args": args,
    }
    if model_ema is not None:
        ckpt["model_ema"] = model_ema
    return ckpt


def assert_distinct(sd: StateDict) -> None:
    """Every tensor holds different values and every k x k kernel (k > 1) is asymmetric, so swaps show."""
    seen: dict[bytes, str] = {}
    for key, t in sd.items():
        blob = t.detach().contiguous().numpy().tobytes()
        assert blob not in seen, f"{key} equals {seen[blob]}"
        seen[blob] = key
        if t.ndim == 4 and t.shape[-1] > 1:
            assert not torch.equal(t, t.transpose(-1, -2)), key


# --- pickles that would run code -------------------------------------------------------------------------------

class CreateFileOnLoad:
    """Unpickling this calls ``open(path, "w")``: the file appearing is proof that code from the pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


OPEN_GLOBAL = f"{open.__module__}.{open.__qualname__}"  # what the pickle references: io.open


def code_running_checkpoints(folder: Path) -> list[tuple[Path, Path]]:
    """Files whose unpickling would create a marker file, as ``(checkpoint, marker)`` pairs.

    A trainer checkpoint with the payload as an extra entry (``torch.save`` zip), the payload hidden inside the
    allowed ``argparse.Namespace``, a legacy (non-zip) ``torch.save``, and a plain protocol-4 ``pickle.dump``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    weights = {"downsample_layers.0.0.weight": torch.randn(8, 3, 4, 4)}
    cases: list[tuple[Path, Path]] = []
    for name in ("extra_entry.pth", "in_namespace.pth", "legacy.pth", "plain_pickle.pt"):
        ckpt, marker = folder / name, folder / f"{name}.created"
        payload = CreateFileOnLoad(marker)
        if name == "in_namespace.pth":
            torch.save({"model": weights, "args": argparse.Namespace(model="convnextv2_atto", hook=payload)}, ckpt)
        elif name == "legacy.pth":
            torch.save({"model": weights, "hook": payload}, ckpt, _use_new_zipfile_serialization=False)
        elif name == "plain_pickle.pt":
            with ckpt.open("wb") as f:
                pickle.dump({"model": weights, "hook": payload}, f, protocol=4)
        else:
            torch.save({"model": weights, "epoch": 3, "hook": payload}, ckpt)
        cases.append((ckpt, marker))
    return cases


def assert_refuses_code_running_pickles(run: Callable[[Path], int], folder: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``run(checkpoint) -> exit code`` must fail on every ``code_running_checkpoints`` file without running it.

    Checks: non-zero exit; the last stderr line names the refused global (``io.open``) in one line; no traceback;
    no advice to use ``weights_only=False``; the marker file was never created.
    """
    for ckpt, marker in code_running_checkpoints(folder):
        rc = run(ckpt)
        out, err = capsys.readouterr()
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert rc != 0, ckpt.name
        assert lines and OPEN_GLOBAL in lines[-1] and ckpt.name in lines[-1], (ckpt.name, err)
        assert "Traceback" not in err and "weights_only=False" not in out + err, (ckpt.name, err)
        assert not marker.exists(), f"{ckpt.name}: code from the pickle ran"
