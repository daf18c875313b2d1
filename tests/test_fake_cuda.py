"""The forward paths the trainer runs on a GPU, traced on this CPU-only machine with fake CUDA tensors.

Under ``FakeTensorMode`` models are built on ``cuda:0`` and their forwards run without a device: shapes, dtypes and
devices propagate, nothing is computed. ``trace`` fails when, from the batch on the device to the loss,

- any op takes or makes a tensor off the GPU (a CPU tensor made inside the forward: an index built with
  ``torch.arange(n)`` and no device, ``torch.tensor(...)`` of a host value, a ``.cpu()``), or
- anything reads a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``, a data-dependent shape):
  fake tensors have no values, so torch raises ``DataDependentOutputException`` / ``DynamicOutputShapeException``.

Each path is traced in its steady state, the second call: the first builds per-device caches once (the
normalisation statistics, the sparse encoder's Morton tables), as the first training step does on a GPU.

What cannot be traced here (backward, autocast, the fused AdamW step, FSDP) is listed in ``test_untraceable``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fcmae.models.sparse as sparse
from fcmae.config import EmaConfig, FinetuneConfig, PretrainConfig, load_config
from fcmae.data.decode import JpegBatch, JpegItem
from fcmae.data.sampling import Sample, sample_mask
from fcmae.models.convnextv2 import Block, build_convnextv2
from fcmae.models.masking import num_kept
from fcmae.models.registry import mean_std
from fcmae.train.finetuning import FinetuneRecipe, build_ema, build_mixup_and_loss
from fcmae.train.pretraining import PretrainRecipe, build_model
from fcmae.train.trainer import param_groups, rehome_lr, set_lr

CUDA = torch.device("cuda", 0)
N, SIZE = 4, 64
PRE = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "data.source=demo", f"data.input_size={SIZE}"]


class OffDevice(TorchDispatchMode):
    """Records every op that takes or returns a tensor that is not on the GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {str(t.device) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        if any(not d.startswith("cuda") for d in devices):
            self.found.append(f"{func} on {sorted(devices)}")
        return out


def trace(mode: FakeTensorMode, fn: Callable[[], Any]) -> Any:
    """``fn()`` twice under ``mode`` (fake CUDA), the second time checked; AssertionError naming what left the
    device or read a device value."""
    check = OffDevice()
    with mode:
        try:
            fn()  # per-device caches are built once
            with check:
                out = fn()
        except (DataDependentOutputException, DynamicOutputShapeException) as exc:
            raise AssertionError(f"host read of a device value: {exc}") from exc
        except RuntimeError as exc:  # FakeTensor's device propagation: a CPU tensor mixed into a CUDA op
            raise AssertionError(f"device mismatch: {str(exc).splitlines()[0]}") from exc
    assert not check.found, "off the GPU: " + "; ".join(check.found[:5])
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            assert t.device == CUDA, t.device
    return out


@pytest.fixture
def mode():
    sparse._MORTON.clear()  # per-device tables: keep fake ones out of other tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast / CUDA availability notes from torch under fake tensors
        yield FakeTensorMode()
    sparse._MORTON.clear()


def _on_device(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    """A host batch tensor moved to the (fake) GPU, as the loader's device placement does."""
    with mode:
        return mode.from_tensor(t).to(CUDA)


def _pretrain_batch(mode: FakeTensorMode, cfg: PretrainConfig) -> Sample:
    """uint8 images and masks drawn per sample as ``SeededSamples`` draws them, then moved to the device."""
    grid = (SIZE // 32, SIZE // 32)
    masks = torch.stack([sample_mask(1000 + i, grid, cfg.model.mask_ratio) for i in range(N)])
    images = torch.randint(0, 256, (N, cfg.model.in_chans, SIZE, SIZE), dtype=torch.uint8)
    return Sample(_on_device(mode, images), _on_device(mode, masks), 0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pretraining_loss_on_fake_cuda(mode, checkpointing):
    cfg = load_config(PretrainConfig, None, [*PRE, "model.drop_path_rate=0.1",
                                             f"run.grad_checkpointing={str(checkpointing).lower()}"])
    recipe = PretrainRecipe(cfg)
    with mode, CUDA:
        model = build_model(cfg).train()  # the recipe's builder
    model.set_grad_checkpointing(cfg.run.grad_checkpointing)
    assert next(model.parameters()).device == CUDA
    batch = _pretrain_batch(mode, cfg)
    assert num_kept(batch.target.shape[1], cfg.model.mask_ratio) == 1
    loss = trace(mode, lambda: recipe.loss(model, batch))
    assert loss.shape == () and loss.dtype == torch.float32


def _finetune_recipe(mode: FakeTensorMode, **over: Any) -> tuple[FinetuneRecipe, torch.nn.Module]:
    """The recipe's step parts as ``setup`` makes them (mixup, loss, normalisation, erasing), without its data."""
    cfg = load_config(FinetuneConfig, None, ["model.name=convnextv2_test", "data.source=fashion_mnist",
                                             f"data.input_size={SIZE}", "data.reprob=0.5", "data.recount=2",
                                             *[f"{k}={v}" for k, v in over.items()]])
    recipe = FinetuneRecipe(cfg)
    from fcmae.data.transforms import DeviceNormalize, DeviceRandomErasing

    recipe.mixup_fn, recipe.criterion = build_mixup_and_loss(cfg.mixup, 10)
    recipe.normalize = DeviceNormalize(*mean_std(cfg.model.in_chans))
    recipe.erase = DeviceRandomErasing(1.0, cfg.data.remode, cfg.data.recount)  # always erase: the path runs
    with mode, CUDA:
        model = build_convnextv2(cfg.model.name, num_classes=10, drop_path_rate=0.1).train()
    return recipe, model


def test_finetuning_loss_with_mixup_erasing_normalisation_on_fake_cuda(mode):
    recipe, model = _finetune_recipe(mode)
    assert recipe.mixup_fn is not None and recipe.erase.probability == 1.0
    images = _on_device(mode, torch.randint(0, 256, (N, 3, SIZE, SIZE), dtype=torch.uint8))
    labels = _on_device(mode, torch.arange(N))
    loss = trace(mode, lambda: recipe.loss(model, Sample(images, labels, 0)))
    assert loss.shape == ()


def test_ema_update_and_the_optimizer_set_up_on_fake_cuda(mode, monkeypatch):
    _, model = _finetune_recipe(mode)
    # timm's ModelEmaV3 makes a generator on the model's device (stochastic rounding of bf16 EMA weights), which
    # needs a real device: here a host one (an fp32 EMA never draws from it)
    host_generator = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda device=None: host_generator())
    # and deepcopy of fake tensors gives each copy a fake mode of its own: the copy is made in this one instead
    import timm.utils.model_ema as model_ema

    def copy_in_mode(m: torch.nn.Module) -> torch.nn.Module:
        with mode, CUDA:
            twin = build_convnextv2("convnextv2_test", num_classes=10, drop_path_rate=0.1)
            twin.load_state_dict(m.state_dict())
        return twin

    monkeypatch.setattr(model_ema, "deepcopy", copy_in_mode)
    ema = build_ema(model, EmaConfig(enabled=True, decay=0.999))
    monkeypatch.undo()
    assert next(ema.parameters()).device == CUDA
    trace(mode, lambda: ema.update(model, step=3))
    # the trainer's fused AdamW with tensor lrs: constructed with host lrs (its constructor checks 0 <= lr, a host
    # read), then moved with the trainer's own rehome_lr; setting the lr each step stays on the device
    groups = param_groups(model, 0.05)
    opt = torch.optim.AdamW([{**g, "lr": torch.zeros(())} for g in groups], lr=torch.zeros(()), fused=True)
    for g in opt.param_groups:
        g["lr"] = mode.from_tensor(g["lr"])
    with mode:
        rehome_lr(opt, CUDA)
    assert all(g["lr"].device == CUDA for g in opt.param_groups)
    trace(mode, lambda: [set_lr(g, 1e-3 * g.get("lr_scale", 1.0)) for g in opt.param_groups])


def test_knn_monitor_feature_pass_and_evaluation_sums_on_fake_cuda(mode):
    from fcmae.evaluation.accuracy import _batch_sums
    from fcmae.weights.loader import create_model

    with mode, CUDA:
        dense = create_model("convnextv2_test", num_classes=0, in_chans=3).eval()  # the monitor's model
        clf = build_convnextv2("convnextv2_test", num_classes=7).eval()
    x = _on_device(mode, torch.randn(N, 3, SIZE, SIZE))
    labels = _on_device(mode, torch.arange(N))
    with torch.no_grad():  # extract_features' device part; it then copies the features to the host, by design
        feats = trace(mode, lambda: dense.forward_features(x).float().mean(dim=(2, 3)))
        sums = trace(mode, lambda: _batch_sums(clf(x).float(), labels))
    assert feats.shape == (N, 32) and sums.shape == (4,)


def test_gpu_decode_crop_after_decode_on_fake_cuda(mode, monkeypatch):
    """``data.decode=gpu``: nvJPEG's output (stubbed: decoded images of their own sizes on the device) cropped and
    resized there; a ready (already cropped) item joins the batch."""
    import fcmae.data.transforms as tr

    sizes = [(3, 80, 96), (3, 64, 64), (3, 120, 72)]
    decoded = [_on_device(mode, torch.randint(0, 256, s, dtype=torch.uint8)) for s in sizes]
    monkeypatch.setattr(tr, "decode_jpeg_batch", lambda datas, in_chans, device: decoded[:len(datas)])
    items = [JpegItem(b"jpeg", (4, 8, 60, 50, 1)), JpegItem(b"jpeg", (0, 0, 64, 64, 0)),
             JpegItem(b"jpeg", (10, 2, 90, 70, 0)),
             JpegItem(None, (0, 0, SIZE, SIZE, 0), ready=torch.zeros(3, SIZE, SIZE, dtype=torch.uint8))]
    decoder = tr.DeviceDecoder(SIZE, 3)
    items[3].ready = mode.from_tensor(items[3].ready)
    with mode:  # the loader's device placement: the ready crop moves with the batch, the bytes stay on the host
        batch = JpegBatch(items).to(CUDA, non_blocking=True)
    assert items[3].ready.device == CUDA and items[0].data == b"jpeg"
    out = trace(mode, lambda: decoder(batch, CUDA))
    assert out.shape == (4, 3, SIZE, SIZE) and out.dtype == torch.uint8


def test_gpu_decode_batch_pins_its_ready_crops(monkeypatch):
    """``pin_memory`` (the DataLoader's pin thread, on CUDA) pins the finished crops; the bytes are left alone."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    ready = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    batch = JpegBatch([JpegItem(b"jpeg", (0, 0, 8, 8, 0)), JpegItem(None, (0, 0, SIZE, SIZE, 0), ready=ready)])
    assert batch.pin_memory() is batch and len(pinned) == 1 and pinned[0] is ready


def _cpu_constant(block_mlp):
    def mlp(self, x):
        return block_mlp(self, x) + torch.zeros(x.shape[-1])  # a CPU tensor made inside the forward
    return mlp


def _host_read(block_mlp):
    def mlp(self, x):
        return block_mlp(self, x) * (1.0 if x.abs().max().item() >= 0 else 0.0)  # .item(): a device sync
    return mlp


@pytest.mark.parametrize("mutation", [_cpu_constant, _host_read])
@pytest.mark.parametrize("path", ["pretrain", "finetune"])
def test_a_cpu_tensor_or_a_host_read_in_the_forward_fails_the_trace(mode, monkeypatch, mutation, path):
    if path == "pretrain":
        cfg = load_config(PretrainConfig, None, PRE)
        recipe = PretrainRecipe(cfg)
        with mode, CUDA:
            model = build_model(cfg)
        batch = _pretrain_batch(mode, cfg)
    else:
        recipe, model = _finetune_recipe(mode)
        batch = Sample(_on_device(mode, torch.randint(0, 256, (N, 3, SIZE, SIZE), dtype=torch.uint8)),
                       _on_device(mode, torch.arange(N)), 0)
    trace(mode, lambda: recipe.loss(model, batch))  # unmutated: passes
    monkeypatch.setattr(Block, "mlp", mutation(Block.mlp))
    with pytest.raises(AssertionError, match="off the GPU|host read|device mismatch"):
        trace(mode, lambda: recipe.loss(model, batch))


def test_untraceable_parts_say_why(mode):
    """What fake tensors cannot run, so that the list in the README stays true (if torch learns one, this fails
    and the list should shrink)."""
    _, model = _finetune_recipe(mode)
    x = _on_device(mode, torch.randn(2, 3, SIZE, SIZE))
    # 1. backward: the autograd engine wants a real device
    with mode, pytest.raises(RuntimeError):
        model(x).sum().backward()
    # 2. fused AdamW's constructor reads its tensor lr on the host (the 0 <= lr check)
    with mode, pytest.raises(DataDependentOutputException):
        torch.optim.AdamW(model.parameters(), lr=torch.zeros((), device=CUDA), fused=True)
    # 3. autocast on "cuda" is turned off (with a warning) when no CUDA device is present: bf16 paths run in fp32
    with mode, torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(x).dtype == torch.float32
    assert not torch.cuda.is_available()


def test_gpu_settings_on_fake_cuda(mode):
    """``run.tf32``, ``run.cudnn_benchmark``, ``run.channels_last``: set for a CUDA device (conv weights stored
    channels-last, and the step still traces), nothing on the CPU."""
    b = torch.backends
    flags = [(mod, attr, getattr(mod, attr)) for mod, attr in ((b.cuda.matmul, "allow_tf32"),
                                                                (b.cudnn, "allow_tf32"), (b.cudnn, "benchmark"))]
    try:
        _gpu_settings(mode, b)
    finally:
        for mod, attr, value in flags:
            setattr(mod, attr, value)


def _gpu_settings(mode: FakeTensorMode, b: Any) -> None:
    from fcmae.train.gpu import apply_gpu_settings

    cfg = load_config(PretrainConfig, None, PRE)
    assert (cfg.run.tf32, cfg.run.cudnn_benchmark, cfg.run.channels_last) == (True, True, True)
    with mode, CUDA:
        model = build_model(cfg)
    cpu_model = build_model(cfg)
    b.cudnn.benchmark = False
    assert apply_gpu_settings(cpu_model, cfg.run, torch.device("cpu")) == [] and not b.cudnn.benchmark
    words = apply_gpu_settings(model, cfg.run, CUDA)
    assert len(words) == 3 and b.cuda.matmul.allow_tf32 and b.cudnn.allow_tf32 and b.cudnn.benchmark
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    recipe, batch = PretrainRecipe(cfg), _pretrain_batch(mode, cfg)
    loss = trace(mode, lambda: recipe.loss(model, batch))
    assert loss.shape == ()
    cfg.run.tf32 = cfg.run.cudnn_benchmark = False
    apply_gpu_settings(model, cfg.run, CUDA)
    assert not (b.cuda.matmul.allow_tf32 or b.cudnn.allow_tf32 or b.cudnn.benchmark)
