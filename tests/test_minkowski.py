"""The MinkowskiEngine backend against our default sparse encoder, and the converter's kernel layout against the
real library. Skipped (with the reason shown by ``-ra``) where MinkowskiEngine cannot be imported."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from fcmae.models.fcmae import create_fcmae
from fcmae.models.masking import random_masking
from fcmae.models.minkowski import INSTALL_HINT, minkowski_available
from fcmae.weights.layouts import official_sparse_to_dense, to_dense

# MinkowskiEngine 0.5.4 instantiates autograd Functions, which torch deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
needs_me = pytest.mark.skipif(
    not minkowski_available(), reason=f"MinkowskiEngine is not importable; build it with {INSTALL_HINT}"
)
VARIANT = "convnextv2_test"


def _pair(name: str = VARIANT, seed: int = 0, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, minkowski) FCMAE models holding the same random weights (GRN/LayerNorm perturbed too)."""
    torch.manual_seed(seed)
    ours = randomize_(create_fcmae(name, decoder_embed_dim=32, **kw), seed=seed)
    mink = create_fcmae(name, decoder_embed_dim=32, backend="minkowski", **kw)
    mink.load_state_dict(ours.state_dict(), strict=True)
    return ours, mink


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())


def _grad_rel(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    """Relative max difference of every parameter's gradient (all must exist)."""
    pb = dict(b.named_parameters())
    out = {}
    for name, p in a.named_parameters():
        assert p.grad is not None and pb[name].grad is not None, name
        out[name] = _rel(pb[name].grad, p.grad)
    return out


@needs_me
@pytest.mark.parametrize(("batch", "name", "size"), [(1, VARIANT, (96, 128)), (3, VARIANT, (128, 96)),
                                                     (8, VARIANT, (64, 96)), (3, "convnextv2_atto", (64, 64))])
def test_encoder_equals_torch_backend_outputs_and_grads(batch, name, size, rng):
    ours, mink = _pair(name)
    h, w = size[0] // 32, size[1] // 32
    x = torch.randn(batch, 3, *size, generator=rng)
    mask = random_masking(batch, (h, w), 0.6, generator=rng)
    a, b = ours.forward_encoder(x, mask), mink.forward_encoder(x, mask)
    assert b.shape == a.shape == (batch, ours.encoder.num_features, h, w)
    assert _rel(b, a) < 1e-4
    assert (b * mask.reshape(batch, 1, h, w)).abs().max() == 0  # zeros at removed cells
    weight = torch.randn(a.shape, generator=rng)
    (a * weight).sum().backward()
    (b * weight).sum().backward()
    diffs = _grad_rel(ours.encoder, mink.encoder)
    assert len(diffs) == len(list(ours.encoder.parameters()))
    assert max(diffs.values()) < 1e-4, max(diffs.items(), key=lambda kv: kv[1])


@needs_me
def test_full_model_loss_and_all_grads_equal_torch_backend(rng):
    ours, mink = _pair()
    x = torch.randn(4, 3, 96, 128, generator=rng)
    mask = random_masking(4, (3, 4), 0.6, generator=rng)
    la, lb = ours(x, mask)["loss"], mink(x, mask)["loss"]
    assert abs(lb.item() - la.item()) <= 1e-5 * abs(la.item())
    la.backward()
    lb.backward()
    assert max(_grad_rel(ours, mink).values()) < 1e-4


@needs_me
def test_grn_per_sample_image_alone_equals_in_batch(rng):
    _, mink = _pair()
    x = torch.randn(5, 3, 64, 96, generator=rng)
    mask = random_masking(5, (2, 3), 0.5, generator=rng)
    batched = mink.forward_encoder(x, mask)
    for i in range(5):
        assert _rel(mink.forward_encoder(x[i : i + 1], mask[i : i + 1])[0], batched[i]) < 1e-5


@needs_me
def test_drop_path_drops_the_same_samples_as_torch_backend(rng):
    ours, mink = _pair(drop_path_rate=0.6)
    ours.train()
    mink.train()
    x = torch.randn(6, 3, 64, 64, generator=rng)
    mask = random_masking(6, 2, 0.5, generator=rng)
    torch.manual_seed(11)
    a = ours.forward_encoder(x, mask)
    torch.manual_seed(11)
    b = mink.forward_encoder(x, mask)
    torch.manual_seed(12)
    assert _rel(ours.forward_encoder(x, mask), a) > 1e-3  # drop path is active: another seed differs
    assert _rel(b, a) < 1e-4
    a.square().sum().backward()
    b.square().sum().backward()
    assert max(_grad_rel(ours.encoder, mink.encoder).values()) < 1e-4


@needs_me
def test_bf16_autocast_runs_with_the_encoder_in_fp32(rng):
    _, mink = _pair()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    mask = random_masking(2, 2, 0.5, generator=rng)
    fp32 = mink(x, mask)["loss"].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mink(x, mask)
    assert abs(out["loss"].item() - fp32) < 0.05 * fp32
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mink.parameters())


# --- the converter's official_sparse kernel layout, proved against the library -----------------------------------

def _sparse_input(me, n: int, height: int, width: int, channels: int, g: torch.Generator):
    """A random sparse tensor (about 60% of an ``n x height x width`` grid present) and its zero-filled dense grid
    ``(n, channels, height, width)``."""
    present = torch.rand(n, height, width, generator=g) < 0.6
    coords = present.nonzero()  # (M, 3): batch, row, col
    feats = torch.randn(len(coords), channels, generator=g)
    dense = torch.zeros(n, height, width, channels)
    dense[coords[:, 0], coords[:, 1], coords[:, 2]] = feats
    return me.SparseTensor(feats, coordinates=coords.int().contiguous()), dense.permute(0, 3, 1, 2)


def _at(dense: torch.Tensor, coords: torch.Tensor, stride: int) -> torch.Tensor:
    """Rows of a dense ``(N, C, H, W)`` map at sparse coordinates ``(M, 3)`` of tensor stride ``stride``."""
    c = coords.long()
    return dense.permute(0, 2, 3, 1)[c[:, 0], c[:, 1] // stride, c[:, 2] // stride]


@needs_me
def test_converter_kernel_layout_matches_real_minkowski_convolutions():
    from fcmae.models.minkowski import import_minkowski

    me = import_minkowski()
    g = torch.Generator().manual_seed(3)
    c_in, c_out = 3, 5
    dw = me.MinkowskiChannelwiseConvolution(c_in, kernel_size=7, bias=True, dimension=2)
    ds = me.MinkowskiConvolution(c_in, c_out, kernel_size=2, stride=2, bias=True, dimension=2)
    with torch.no_grad():
        for p in (dw.kernel, dw.bias, ds.kernel, ds.bias):
            p.copy_(torch.randn(p.shape, generator=g))
    # the official checkpoint's keys for a block's channel-wise conv and a downsample conv, real library tensors
    official = {f"encoder.{key}.{attr}": getattr(mod, attr).detach() for key, mod in
                (("stages.0.0.dwconv", dw), ("downsample_layers.1.1", ds)) for attr in ("kernel", "bias")}
    dense, layout = to_dense(official)
    assert layout == "official_sparse"
    w_dw, w_ds = dense["stages.0.0.dwconv.weight"], dense["downsample_layers.1.1.weight"]
    assert w_dw.shape == (c_in, 1, 7, 7) and w_ds.shape == (c_out, c_in, 2, 2)
    assert (w_dw - w_dw.transpose(-1, -2)).abs().max() > 0.1  # non-symmetric: a height/width swap would show
    assert (w_ds - w_ds.transpose(-1, -2)).abs().max() > 0.1
    x, grid = _sparse_input(me, 2, 12, 14, c_in, g)  # non-square grid
    with torch.no_grad():
        y = dw(x)
        ref = F.conv2d(grid, w_dw, dense["stages.0.0.dwconv.bias"], padding=3, groups=c_in)
        assert torch.equal(y.C, x.C)  # submanifold: outputs at the input positions
        assert _rel(y.F, _at(ref, y.C, 1)) < 1e-5
        z = ds(x)
        ref = F.conv2d(grid, w_ds, dense["downsample_layers.1.1.bias"], stride=2)
        assert _rel(z.F, _at(ref, z.C, 2)) < 1e-5


@needs_me
def test_kernel_offsets_are_read_from_the_library():
    from fcmae.models.minkowski import import_minkowski, kernel_offsets

    me = import_minkowski()
    offsets = kernel_offsets(me.MinkowskiChannelwiseConvolution(1, kernel_size=7, dimension=2))
    assert sorted(offsets) == [(r, c) for r in range(-3, 4) for c in range(-3, 4)]
    assert offsets[:2] == [(-3, -3), (-2, -3)]  # (d_row, d_col): the row offset varies fastest
    assert kernel_offsets(me.MinkowskiConvolution(1, 1, kernel_size=2, stride=2, dimension=2)) == [
        (0, 0), (1, 0), (0, 1), (1, 1)]


@needs_me
def test_official_state_dict_from_live_modules_matches_converter_and_round_trips(rng):
    from fcmae.models.minkowski import _BoundConv, load_official_state_dict, official_state_dict

    _, mink = _pair()
    enc = mink.encoder
    sd = official_state_dict(enc)
    for path, mod in enc.official.named_modules():  # kernels have the live modules' own shapes
        if isinstance(mod, _BoundConv):
            assert sd[f"encoder.{path}.kernel"].shape == mod.kernel_shape
    assert sd["encoder.stages.0.0.dwconv.kernel"].shape == (49, 8)
    assert sd["encoder.downsample_layers.1.1.kernel"].shape == (4, 8, 16)
    assert sd["encoder.stages.0.0.grn.gamma"].shape == (1, 32)
    assert {k for k in sd if ".ln." in k} and {k for k in sd if ".linear." in k}
    dense = official_sparse_to_dense(sd)
    ours = enc.state_dict()
    assert dense.keys() == ours.keys()
    assert all(torch.equal(dense[k], ours[k]) for k in ours)
    # import into a fresh encoder: same weights, same outputs
    _, fresh = _pair(seed=1)
    load_official_state_dict(fresh.encoder, {**sd, "proj.weight": torch.zeros(1)})  # decoder keys are ignored
    assert all(torch.equal(fresh.encoder.state_dict()[k], ours[k]) for k in ours)
    x = torch.randn(2, 3, 64, 64, generator=rng)
    mask = random_masking(2, 2, 0.5, generator=rng)
    assert torch.equal(fresh.forward_encoder(x, mask), mink.forward_encoder(x, mask))
    with pytest.raises(KeyError, match="missing"):
        load_official_state_dict(fresh.encoder, {k: v for k, v in sd.items() if "dwconv.kernel" not in k})


# --- without the library -----------------------------------------------------------------------------------------

def test_missing_minkowski_names_the_install_script(monkeypatch):
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    with pytest.raises(ImportError, match="scripts/install_minkowski.sh"):
        create_fcmae(VARIANT, backend="minkowski")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="torch, minkowski"):
        create_fcmae(VARIANT, backend="cuda")
