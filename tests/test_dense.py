"""The dense ConvNeXt V2 and V1: sizes against the papers and timm, equivalence with timm, gradients, and the
user-facing errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomize_

from fcmae.models.convnextv2 import ConvNeXtV2
from fcmae.models.registry import get_variant, list_models
from fcmae.weights.layouts import dense_to_timm, timm_to_dense
from fcmae.weights.loader import create_model

# ImageNet-1k classifier sizes from the ConvNeXt V2 paper (Table 7 / model zoo), millions of parameters; pinned
# here independently of the registry's own record of them, which the test below checks as well
PAPER_PARAMS_M = {
    "convnextv2_atto": 3.7,
    "convnextv2_femto": 5.2,
    "convnextv2_pico": 9.1,
    "convnextv2_nano": 15.6,
    "convnextv2_tiny": 28.6,
    "convnextv2_base": 89.0,
    "convnextv2_large": 198.0,
    "convnextv2_huge": 660.0,
    # ConvNeXt V1 ("A ConvNet for the 2020s", Table 1/model zoo: whole millions); atto ... nano are timm's own
    "convnext_tiny": 29.0,
    "convnext_small": 50.0,
    "convnext_base": 89.0,
    "convnext_large": 198.0,
    "convnext_xlarge": 350.0,
}
V1_TIMM = ["convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny", "convnext_small",
           "convnext_base", "convnext_large", "convnext_xlarge"]


def _meta_model(name: str, monkeypatch: pytest.MonkeyPatch, **kw) -> ConvNeXtV2:
    """Build a variant on the ``meta`` device: shapes only, no memory, no init cost (huge has 660M parameters)."""
    del monkeypatch  # kept in the signature for callers; the model builds on meta directly
    with torch.device("meta"):
        model = create_model(name, **kw)
    assert all(p.device.type == "meta" for p in model.parameters())
    return model


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _timm_pair(name: str, in_chans: int = 3, seed: int = 0) -> tuple[ConvNeXtV2, torch.nn.Module]:
    """Our model with every parameter perturbed (GRN and LayerNorms included) and timm's with the same weights."""
    torch.manual_seed(seed)
    ours = randomize_(create_model(name, in_chans=in_chans), scale=0.05, seed=seed).eval()
    theirs = timm.create_model(name, pretrained=False, in_chans=in_chans).eval()
    theirs.load_state_dict(dense_to_timm(ours.state_dict(), name), strict=True)
    return ours, theirs


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", list_models())
def test_every_registered_variant_builds_with_the_papers_size(name, monkeypatch):
    """Every variant is built from its registry record alone; the paper's variants have the paper's size."""
    v = get_variant(name)
    model = _meta_model(name, monkeypatch, num_classes=1000)
    assert (model.depths, model.dims) == (v.depths, v.dims)
    assert v.paper_params_m == PAPER_PARAMS_M.get(name)
    if v.paper_params_m is not None:
        n = _count(model)
        # the V1 paper gives whole millions (rounding: +-0.5M), the V2 paper one decimal (1 %)
        tol = 0.5 if v.family == "v1" else 0.01 * v.paper_params_m
        assert abs(n / 1e6 - v.paper_params_m) <= tol, f"{name}: {n / 1e6:.3f}M"
    assert v.in_timm == timm.is_model(name)
    if v.in_timm:  # timm's conv-MLP flag and parameter count for the variant are the registry's
        with torch.device("meta"):
            theirs = timm.create_model(name, pretrained=False)
        assert (theirs.state_dict()["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4) == v.timm_conv_mlp
        assert abs(_count(model) - _count(theirs)) <= 0.005 * _count(theirs), (name, _count(model), _count(theirs))


def test_v1_family_is_registered_with_timms_architecture():
    """Every ConvNeXt V1 of timm is a record: LayerScale at timm's init, no GRN, timm's depths and widths."""
    v1 = [n for n in list_models() if get_variant(n).family == "v1" and get_variant(n).in_timm]
    assert v1 == V1_TIMM
    for name in v1:
        v = get_variant(name)
        with torch.device("meta"):
            theirs = timm.create_model(name, pretrained=False)
        assert (v.use_grn, v.ls_init_value) == (False, 1e-6)
        assert [len(s.blocks) for s in theirs.stages] == list(v.depths)
        assert [s.blocks[0].conv_dw.in_channels for s in theirs.stages] == list(v.dims)
        assert not any("grn" in k for k in theirs.state_dict())
    fresh = create_model("convnext_atto")
    assert fresh.stages[2][3].gamma.shape == (160,) and torch.all(fresh.stages[2][3].gamma == 1e-6)
    assert fresh.stages[0][0].grn is None and fresh.use_grn is False


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnext_atto", "convnext_tiny"])
def test_forward_intermediates_and_feature_info_match_timm(name):
    """timm's backbone interface: the same stage maps as timm's model with the same weights, and feature_info."""
    ours = randomize_(create_model(name, num_classes=0), scale=0.05).eval()
    theirs = timm.create_model(name, pretrained=False, num_classes=0).eval()
    theirs.load_state_dict(dense_to_timm(dict(ours.state_dict()), name), strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = ours.forward_intermediates(x)
        ref = theirs.forward_intermediates(x, intermediates_only=True)
    assert [m.shape for m in maps] == [r.shape for r in ref]
    for m, r in zip(maps, ref):
        torch.testing.assert_close(m, r, rtol=1e-4, atol=1e-5)
    assert torch.equal(final, maps[-1])
    assert [f["num_chs"] for f in ours.feature_info] == [f["num_chs"] for f in theirs.feature_info]
    assert [f["reduction"] for f in ours.feature_info] == [f["reduction"] for f in theirs.feature_info]
    last2 = ours.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(last2) == 2 and torch.equal(last2[1], maps[-1])
    with pytest.raises(ValueError, match="stage indices"):
        ours.forward_intermediates(x, indices=[4])


def test_meta_build_has_real_shapes(monkeypatch):
    real = create_model("convnextv2_atto")
    meta = _meta_model("convnextv2_atto", monkeypatch)
    assert {k: v.shape for k, v in real.state_dict().items()} == {k: v.shape for k, v in meta.state_dict().items()}


# ---------------------------------------------------------------------------------------------- timm equivalence


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny", "convnext_atto", "convnext_tiny"])
def test_same_logits_and_gradients_as_timm(name):
    ours, theirs = _timm_pair(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    lo, lt = ours(xo), theirs(xt)  # (2, 1000)
    assert lo.shape == lt.shape == (2, 1000)
    assert lt.abs().max() > 0.1  # perturbed weights: the logits are not trivially ~0
    assert (lo - lt).abs().max() <= 1e-4
    # a loss that weighs every logit differently, so every parameter's gradient is exercised
    w = torch.randn(lo.shape, generator=g)
    (lo * w).sum().backward()
    (lt * w).sum().backward()
    assert torch.allclose(xo.grad, xt.grad, rtol=1e-4, atol=1e-4 * float(xt.grad.abs().max()))
    ours_grads = dense_to_timm({k: p.grad for k, p in ours.named_parameters()}, name)
    theirs_params = dict(theirs.named_parameters())
    assert ours_grads.keys() == theirs_params.keys()
    for key, grad in ours_grads.items():
        ref = theirs_params[key].grad
        assert ref is not None and grad.shape == ref.shape, key
        assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max().clamp_min(1e-6))), key


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny", "convnext_atto", "convnext_tiny"])
def test_timm_layout_round_trip(name):
    sd = randomize_(create_model(name), scale=0.05).state_dict()
    back = timm_to_dense(dense_to_timm(sd, name))
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_in_chans_1_matches_timm():
    ours, theirs = _timm_pair("convnextv2_atto", in_chans=1)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------- every variant


def _fwd_bwd_every_param(model: ConvNeXtV2) -> None:
    name = type(model).__name__
    model.train()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    logits = model(x)  # (1, 1000)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    (logits * torch.randn_like(logits)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for key, p in model.named_parameters():
        # fresh GRNs are identities, but gamma/beta still get gradients; at 32px stage 3 is 1x1, so its 7x7
        # dwconv weight only gets a gradient at the centre tap: "not all zero" is the right check for all
        assert p.grad is not None, f"{name}: {key} has no gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {key} has an all-zero gradient"
        assert torch.isfinite(p.grad).all(), key


# V1 base/large have V2 base/large's shapes (tested here); xlarge (350M) is as slow as huge
@pytest.mark.parametrize("name", [n for n in list_models() if n not in ("convnextv2_huge", "convnext_base",
                                                                        "convnext_large", "convnext_xlarge")])
def test_forward_backward_every_variant(name):
    torch.manual_seed(0)
    _fwd_bwd_every_param(create_model(name))


@pytest.mark.slow
def test_forward_backward_huge(monkeypatch):
    # 660M parameters: truncated-normal init alone takes seconds, so allocate uninitialised and fill cheaply
    model = _meta_model("convnextv2_huge", monkeypatch).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.03, 0.03, generator=g)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):  # unit scales keep activations O(1) through 36 blocks
                m.weight.fill_(1.0)
    _fwd_bwd_every_param(model)


# ---------------------------------------------------------------------------------------------- API and errors


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model") as info:
        create_model("convnextv2_gigantic")
    for known in list_models():
        assert known in str(info.value)


def test_short_names_work():
    assert _count(create_model("test")) == _count(create_model("convnextv2_test"))


@pytest.mark.parametrize("hw", [(100, 96), (64, 48), (16, 32)])
def test_sides_not_multiple_of_32_rejected(hw):
    model = create_model("convnextv2_test")
    with pytest.raises(ValueError, match=f"{hw[0]}x{hw[1]}"):
        model(torch.randn(1, 3, *hw))


def test_wrong_channel_count_rejected():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        create_model("convnextv2_test")(torch.randn(1, 1, 32, 32))


def test_in_chans_1_non_square_and_memory_format():
    torch.manual_seed(0)
    model = randomize_(create_model("convnextv2_test", in_chans=1), scale=0.05).eval()
    x = torch.randn(2, 1, 64, 96)
    feats = model.forward_features(x)  # (N, C, H/32, W/32)
    assert feats.shape == (2, 32, 2, 3)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a = model(x)
        b = model(x.contiguous(memory_format=torch.channels_last))
    assert a.shape == (2, 1000) and torch.allclose(a, b, atol=1e-6)


def test_reset_classifier():
    torch.manual_seed(0)
    model = randomize_(create_model("convnextv2_test"), scale=0.05).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)  # (N, C_last)
    model.reset_classifier(10)
    assert model.num_classes == 10 and model.head.weight.shape == (10, 32)
    assert model.head.weight.std() < 1e-4 and torch.equal(model.head.bias, torch.zeros(10))
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        model.reset_classifier(0)
        assert torch.equal(model(x), pooled)


def test_num_classes_0_returns_pooled_features():
    torch.manual_seed(0)
    full = randomize_(create_model("convnextv2_test"), scale=0.05).eval()
    bare = create_model("convnextv2_test", num_classes=0).eval()
    missing, unexpected = bare.load_state_dict(full.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["head.bias", "head.weight"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = bare(x)
        assert feats.shape == (2, bare.num_features)
        assert torch.allclose(feats, full.forward_head(full.forward_features(x), pre_logits=True))
        # pooled = LayerNorm of the spatial mean of the last stage
        ref = F.layer_norm(full.forward_features(x).mean((2, 3)), (32,), full.norm.weight, full.norm.bias, 1e-6)
        assert torch.allclose(feats, ref, atol=1e-6)


def test_drop_path_train_runs_eval_deterministic():
    torch.manual_seed(0)
    model = randomize_(create_model("convnextv2_test", drop_path_rate=0.5), scale=0.05)
    plain = create_model("convnextv2_test")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    outs = [model(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # stochastic depth is active in training
    model.eval()
    plain.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        assert torch.allclose(a, plain(x), atol=1e-6)  # in eval, drop path is the identity


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = randomize_(create_model("convnextv2_test"), scale=0.05)
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)  # (N, 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
