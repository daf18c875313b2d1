"""The sparse encoder and FCMAE against the independent masked-dense reference, for ConvNeXt V2 (GRN) and V1
(LayerScale) blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

from fcmae import create_model
from fcmae.models.fcmae import create_fcmae, patchify, unpatchify
from fcmae.models.masking import kept_indices, random_masking, upsample_mask
from fcmae.models.reference import create_reference_fcmae

VARIANT = "convnextv2_test"
V1 = "convnext_test"  # the same shapes with ConvNeXt V1 blocks (LayerScale, no GRN)
FAMILIES = [VARIANT, V1]


def _pair(in_chans: int = 3, variant: str = VARIANT, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = randomize_(create_fcmae(variant, in_chans=in_chans, decoder_embed_dim=32, **kw))
    ref = create_reference_fcmae(variant, in_chans=in_chans, decoder_embed_dim=32, **kw)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())


def test_random_masking_counts_and_seed(rng):
    m = random_masking(5, (7, 7), 0.6, generator=rng)
    assert m.shape == (5, 49) and m.dtype == torch.bool
    assert (m.sum(1) == 49 - int(49 * 0.4)).all()
    m2 = random_masking(5, (7, 7), 0.6, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(m, m2)
    # uniform: every cell is removed with frequency ~0.6 over many draws
    freq = random_masking(4000, (4, 4), 0.6, generator=rng).float().mean(0)
    assert (freq - (16 - int(16 * 0.4)) / 16).abs().max() < 0.04
    up = upsample_mask(m, (7, 7), 4)
    assert up.shape == (5, 28, 28) and torch.equal(up[:, ::4, ::4].reshape(5, 49), m)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 4, ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        create_fcmae(VARIANT)(torch.randn(2, 3, 64, 64), mask_ratio=ratio)


@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_encoder_matches_masked_dense_reference(batch, variant, rng):
    ours, ref = _pair(variant=variant)
    if variant == V1:  # randomized LayerScale, no GRN: the V1 block really runs
        assert ours.encoder.stages[2][1].grn is None and ours.encoder.stages[2][1].gamma.abs().min() > 0
    x = torch.randn(batch, 3, 128, 96, generator=rng)
    mask = random_masking(batch, (4, 3), 0.6, generator=rng)
    a = ours.forward_encoder(x, mask)
    b = ref.forward_encoder(x, mask)
    assert a.shape == (batch, 32, 4, 3)
    assert _rel(a, b) < 1e-5
    vis = (~mask).reshape(batch, 1, 4, 3)
    assert (a * ~vis).abs().max() == 0  # zeros at removed cells
    # gradients of a loss on the visible outputs, for every parameter
    w = torch.randn(a.shape, generator=rng)
    (a * w).sum().backward()
    (b * w).sum().backward()
    ref_params = dict(ref.named_parameters())
    n_checked = 0
    for name, p in ours.encoder.named_parameters():
        q = ref_params[f"encoder.{name}"]
        assert p.grad is not None and q.grad is not None, name
        assert _rel(p.grad, q.grad) < 1e-4, name
        n_checked += 1
    assert n_checked == len(list(ours.encoder.parameters()))


@pytest.mark.parametrize("variant", FAMILIES)
def test_full_model_loss_and_grads_match_reference(variant, rng):
    ours, ref = _pair(variant=variant)
    assert (ours.decoder[0].gamma is None) == (variant == VARIANT)  # the decoder's blocks are the encoder's kind
    x = torch.randn(4, 3, 96, 128, generator=rng)
    mask = random_masking(4, (3, 4), 0.6, generator=rng)
    la, lb = ours(x, mask)["loss"], ref(x, mask)["loss"]
    assert abs(la.item() - lb.item()) < 1e-5 * abs(lb.item())
    la.backward()
    lb.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert _rel(p.grad, ref_params[name].grad) < 1e-4, name


def test_mask_ratio_zero_equals_dense_forward_features(rng):
    ours, _ = _pair()
    dense = create_model(VARIANT, num_classes=0)
    missing, unexpected = dense.load_state_dict(ours.encoder.state_dict(), strict=False)
    assert sorted(missing) == ["norm.bias", "norm.weight"] and not unexpected
    x = torch.randn(2, 3, 64, 96, generator=rng)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    assert _rel(ours.forward_encoder(x, mask), dense.forward_features(x)) < 1e-5


def test_encoder_state_dict_matches_dense_names_and_shapes():
    ours = create_fcmae("convnextv2_atto")
    dense = create_model("convnextv2_atto", num_classes=0).state_dict()
    enc = ours.encoder.state_dict()
    assert set(dense) - set(enc) == {"norm.weight", "norm.bias"}
    assert set(enc) <= set(dense)
    assert all(enc[k].shape == dense[k].shape for k in enc)


@pytest.mark.parametrize("variant", FAMILIES)
def test_per_sample_image_alone_equals_in_batch(variant, rng):
    """Per sample: an image's features and its gradients do not depend on the rest of the batch."""
    ours, ref = _pair(variant=variant)
    x = torch.randn(5, 3, 64, 64, generator=rng)
    mask = random_masking(5, 2, 0.5, generator=rng)
    batched = ours.forward_encoder(x, mask)
    w = torch.randn(batched.shape, generator=rng)
    for i in range(5):
        alone = ours.forward_encoder(x[i : i + 1], mask[i : i + 1])
        assert _rel(alone[0], batched[i]) < 1e-5
        assert _rel(alone[0], ref.forward_encoder(x[i : i + 1], mask[i : i + 1])[0]) < 1e-5
    # the gradient of one image's loss through the batched sparse encoder equals the reference's on that image alone
    params = list(ours.encoder.parameters())
    got = torch.autograd.grad((batched[2] * w[2]).sum(), params)
    ref_out = ref.forward_encoder(x[2:3], mask[2:3])
    want = torch.autograd.grad((ref_out[0] * w[2]).sum(), list(ref.encoder.parameters()))
    for (name, _), a, b in zip(ours.encoder.named_parameters(), got, want):
        assert _rel(a, b) < 1e-4, name


def test_masked_pixels_never_reach_visible_features(rng):
    ours, _ = _pair()
    x = torch.randn(2, 3, 96, 96, generator=rng)
    mask = random_masking(2, 3, 0.6, generator=rng)
    a = ours.forward_encoder(x, mask)
    pix_removed = upsample_mask(mask, 3, 32).unsqueeze(1)
    x2 = torch.where(pix_removed, torch.randn_like(x) * 100, x)
    assert torch.equal(a, ours.forward_encoder(x2, mask))


def test_loss_counts_removed_patches_only(rng):
    ours, _ = _pair()
    x = torch.randn(2, 3, 96, 96, generator=rng)
    mask = random_masking(2, 3, 0.6, generator=rng)
    out = ours(x, mask)
    # changing visible pixels changes the loss only through the encoder: with the encoder input held fixed,
    # i.e. comparing the loss term against targets, only removed cells count
    target = patchify(x)
    pred = out["pred"]
    per = (pred - (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt())
    expected = (per.pow(2).mean(-1) * mask).sum() / mask.sum()
    assert abs(out["loss"].item() - expected.item()) < 1e-5
    assert (pred[~mask] == 0).all()  # no prediction computed at visible cells by default
    full = ours(x, mask, predict_all=True)
    assert torch.allclose(full["pred"][mask], pred[mask], atol=1e-5)
    assert abs(float(full["loss"]) - float(out["loss"])) < 1e-5
    # the target term ignores visible cells: the loss of the (fixed) predictions against images that differ
    # only inside visible patches is the same
    x_vis_changed = torch.where(upsample_mask(mask, 3, 32).unsqueeze(1), x, torch.randn_like(x))
    assert abs(float(ours.forward_loss(x_vis_changed, pred.detach(), mask)) - float(out["loss"])) < 1e-5


def test_norm_pix_loss_off_uses_raw_pixels(rng):
    ours, ref = _pair(norm_pix_loss=False)
    x = torch.randn(2, 3, 64, 64, generator=rng)
    mask = random_masking(2, 2, 0.5, generator=rng)
    out = ours(x, mask, predict_all=True)
    expected = ((out["pred"] - patchify(x)).pow(2).mean(-1) * mask).sum() / mask.sum()
    assert abs(out["loss"].item() - expected.item()) < 1e-5
    assert abs(float(out["loss"]) - float(ref(x, mask)["loss"])) < 1e-4


def test_non_square_and_single_channel(rng):
    ours, ref = _pair(in_chans=1)
    x = torch.randn(2, 1, 224, 160, generator=rng)
    mask = random_masking(2, (7, 5), 0.6, generator=rng)
    out = ours(x, mask)
    assert out["pred"].shape == (2, 35, 32 * 32 * 1)
    assert abs(float(out["loss"]) - float(ref(x, mask)["loss"])) < 1e-4 * float(out["loss"])


def test_patchify_roundtrip(rng):
    x = torch.randn(2, 3, 64, 96, generator=rng)
    assert torch.equal(unpatchify(patchify(x), (2, 3), 3), x)


def test_bad_inputs_raise_clear_errors(rng):
    ours, _ = _pair()
    with pytest.raises(ValueError, match="100x96"):
        ours(torch.randn(1, 3, 100, 96))
    with pytest.raises(ValueError, match="mask has shape"):
        ours(torch.randn(2, 3, 64, 64), mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same number"):
        kept_indices(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ours(torch.randn(1, 1, 64, 64))


def test_bf16_autocast_runs_and_stays_close(rng):
    ours, _ = _pair()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    mask = random_masking(2, 2, 0.5, generator=rng)
    fp32 = ours(x, mask)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x, mask)
    assert out["loss"].dtype == torch.float32
    assert abs(float(out["loss"]) - float(fp32)) < 0.05 * float(fp32)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_generator_makes_masks_reproducible():
    ours = create_fcmae(VARIANT, decoder_embed_dim=32)
    x = torch.randn(2, 3, 64, 64)
    a = ours(x, generator=torch.Generator().manual_seed(3))
    b = ours(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["loss"], b["loss"])


def test_custom_autograd_functions_pass_gradcheck():
    from fcmae.models.convnextv2 import _GRNFunction
    from fcmae.models.sparse import SparseContext, _SparseDWConv

    g = torch.Generator().manual_seed(0)
    for shape, dims in (((2, 5, 6), (1,)), ((2, 3, 4, 6), (1, 2))):
        args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in (shape, (6,), (6,))]
        assert torch.autograd.gradcheck(lambda x, w, b, d=dims: _GRNFunction.apply(x, w, b, d, 1e-6), args)
    keep = torch.tensor([[0, 3], [1, 2]])
    ctx = SparseContext(keep, 2, 2)
    x = torch.randn(2, 2 * 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _SparseDWConv.apply(x, w, b, ctx.index(2), (2, 4, 4)), (x, w, b))


def test_grn_linear_fusion_gradcheck_and_equals_grn_then_linear():
    from fcmae.models.convnextv2 import GRN, Block, _fuse_grn_linear, _GRNLinear

    g = torch.Generator().manual_seed(0)
    x, gamma, beta = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((3, 7, 8), 8, 8))
    w, b = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((4, 8), 4))
    assert torch.autograd.gradcheck(lambda *a: _GRNLinear.apply(*a, 1e-6), (x, gamma, beta, w, b))
    no_bias = lambda x, gm, bt, w: _GRNLinear.apply(x, gm, bt, w, None, 1e-6)  # noqa: E731
    assert torch.autograd.gradcheck(no_bias, (x, gamma, beta, w))
    # fp32, realistic sizes: same output and gradients as GRN followed by the Linear
    grn, lin = GRN(64), torch.nn.Linear(64, 16)
    with torch.no_grad():
        grn.gamma.normal_(generator=g), grn.beta.normal_(generator=g)
    x = torch.randn(4, 300, 64, generator=g, requires_grad=True)
    params = [x, grn.gamma, grn.beta, lin.weight, lin.bias]
    y1 = lin(grn(x, dims=(1,)))
    gy = torch.randn(y1.shape, generator=g)
    y2 = _GRNLinear.apply(x, grn.gamma, grn.beta, lin.weight, lin.bias, grn.eps)
    assert torch.allclose(y1, y2, atol=1e-5, rtol=1e-5)
    for a, c in zip(torch.autograd.grad(y1, params, gy), torch.autograd.grad(y2, params, gy)):
        assert torch.allclose(a, c, atol=1e-4 * float(a.abs().max()), rtol=1e-4)
    # the block picks the fusion by shape (T >= C) and dtype; its output is GRN followed by the Linear
    blk = Block(8)
    assert _fuse_grn_linear(torch.zeros(2, 8, 32), blk.pwconv2)
    assert not _fuse_grn_linear(torch.zeros(2, 7, 32), blk.pwconv2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _fuse_grn_linear(torch.zeros(2, 8, 32), blk.pwconv2)  # fp32 activation under bf16 autocast
        assert _fuse_grn_linear(torch.zeros(2, 8, 32, dtype=torch.bfloat16), blk.pwconv2)
    with torch.no_grad():
        blk.grn.gamma.normal_(generator=g), blk.grn.beta.normal_(generator=g)
    x = torch.randn(2, 3, 3, 8, generator=g)  # 9 positions >= 8 channels: fused
    plain = blk.pwconv2(blk.grn(blk.act(blk.pwconv1(blk.norm(x))), dims=(1, 2)))
    assert torch.allclose(blk.mlp(x), plain, atol=1e-5)


@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("depth", [0, 2])
def test_decoder_depths_match_the_reference(depth, variant, rng):
    """The decoder's last block runs its final Linear on removed cells only; with no block, the head still does."""
    ours, ref = _pair(decoder_depth=depth, variant=variant)
    x = torch.randn(2, 3, 96, 96, generator=rng)
    mask = random_masking(2, 3, 0.6, generator=rng)
    a, b = ours(x, mask), ref(x, mask)
    assert _rel(a["loss"], b["loss"]) < 1e-4
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert _rel(p.grad, q.grad) < 1e-3, name


@pytest.mark.parametrize("use_grn,ls", [(True, None), (False, None), (False, 1e-6)])
def test_block_forward_rows_equals_the_whole_block_at_those_rows(use_grn, ls):
    from fcmae.models.convnextv2 import Block

    g = torch.Generator().manual_seed(0)
    blk = Block(16, use_grn=use_grn, ls_init_value=ls)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(3, 16, 4, 5, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    rows = torch.stack([torch.randperm(20, generator=g)[:7] for _ in range(3)])
    full = blk(x).permute(0, 2, 3, 1).reshape(3, 20, 16)
    want = torch.gather(full, 1, rows.unsqueeze(-1).expand(-1, -1, 16))
    got = blk.forward_rows(x, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gy = torch.randn(got.shape, generator=g)
    params = [x, *blk.parameters()]
    for a, b in zip(torch.autograd.grad(want, params, gy), torch.autograd.grad(got, params, gy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("in_chans,norm", [(3, True), (1, False), (2, True)])
def test_cell_targets_equal_patch_targets_of_those_cells(in_chans, norm):
    from fcmae.models.fcmae import cell_targets, patch_targets

    g = torch.Generator().manual_seed(5)
    imgs = torch.randn(3, in_chans, 64, 96, generator=g)
    cells = torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(3)])
    want = torch.gather(patch_targets(imgs, norm), 1, cells.unsqueeze(-1).expand(-1, -1, 32 * 32 * in_chans))
    torch.testing.assert_close(cell_targets(imgs, cells, norm), want, rtol=1e-5, atol=1e-5)
