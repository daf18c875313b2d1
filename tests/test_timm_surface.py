"""The model surface timm users call, on the dense ConvNeXt V2, equal to timm's ConvNeXt V2 on the same weights:
``forward_head(x, pre_logits=True)``, ``no_weight_decay`` (through the optimizer groups timm builds from it),
``set_grad_checkpointing`` and ``pretrained_cfg``/``default_cfg`` (also the exported timm folder's config.json)."""

from __future__ import annotations

import json

import pytest
import torch

from fcmae.models.convnextv2 import build_convnextv2
from fcmae.models.registry import get_variant, list_models, pretrained_cfg
from fcmae.train.trainer import param_groups
from fcmae.weights.exports import export_timm_folder
from fcmae.weights.layouts import dense_to_timm
from tests.conftest import randomize_

timm = pytest.importorskip("timm")
CFG_FIELDS = ("input_size", "pool_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "num_classes",
              "fixed_input_size")


def _pair(name: str, drop_path_rate: float = 0.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = randomize_(build_convnextv2(name, num_classes=1000, drop_path_rate=drop_path_rate), scale=0.05)
    theirs = timm.create_model(name, pretrained=False, drop_path_rate=drop_path_rate)
    theirs.load_state_dict(dense_to_timm(dict(ours.state_dict()), name), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])  # 1x1-conv MLPs and Linear MLPs
def test_forward_head_pre_logits_and_features_equal_timm(name):
    ours, theirs = _pair(name)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fo, ft = ours.forward_features(x), theirs.forward_features(x)
        assert fo.shape == ft.shape and float((fo - ft).abs().max()) <= 1e-4 * float(ft.abs().max())
        po, pt = ours.forward_head(fo, pre_logits=True), theirs.forward_head(ft, pre_logits=True)
        assert po.shape == pt.shape == (2, get_variant(name).dims[-1]) and po.std() > 0.1
        assert float((po - pt).abs().max()) <= 1e-4
        lo, lt = ours.forward_head(fo), theirs.forward_head(ft)
        assert float((lo - lt).abs().max()) <= 1e-4
    assert ours.get_classifier() is ours.head


def test_no_weight_decay_gives_timms_optimizer_groups():
    """timm defines no ``no_weight_decay`` for ConvNeXt (its factory then exempts the 1-D parameters); ours returns
    none either, and the groups built from each model hold the same parameters (mapped to timm's names)."""
    name = "convnextv2_atto"
    ours, theirs = _pair(name)
    assert ours.no_weight_decay() == set() and not hasattr(theirs, "no_weight_decay")
    to_timm = dense_to_timm({k: torch.tensor(i) for i, k in enumerate(dict(ours.named_parameters()))}, name)
    index_to_timm = {int(v): k for k, v in to_timm.items()}
    ours_names = {id(p): i for i, (_, p) in enumerate(ours.named_parameters())}
    theirs_by_id = {id(p): n for n, p in theirs.named_parameters()}

    def decay_sets(groups, names):
        return {g["weight_decay"]: sorted(names(p) for p in g["params"]) for g in groups}

    mine = decay_sets(param_groups(ours, 0.05), lambda p: index_to_timm[ours_names[id(p)]])
    ref = decay_sets(timm.optim.param_groups_weight_decay(theirs, 0.05), lambda p: theirs_by_id[id(p)])
    assert mine == ref and len(mine[0.0]) > 0 and len(mine[0.05]) > 0


def test_set_grad_checkpointing_equals_timm_gradients():
    ours, theirs = _pair("convnextv2_atto", drop_path_rate=0.0)
    ours.set_grad_checkpointing(), theirs.set_grad_checkpointing(True)
    assert theirs.stages[0].grad_checkpointing and ours.stages[0].grad_checkpointing
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for m in (ours, theirs):
        m(x).square().mean().backward()
    theirs_grads = dict(theirs.named_parameters())
    mapped = dense_to_timm({k: p.grad for k, p in ours.named_parameters()}, "convnextv2_atto")
    worst = max(float((mapped[k].reshape(theirs_grads[k].shape) - theirs_grads[k].grad).abs().max()
                      / theirs_grads[k].grad.abs().max().clamp_min(1e-12)) for k in mapped)
    assert worst <= 1e-3, worst


# V2 only: timm's V1 records are of other recipes (its own crop_pct per tag), and fcmae's record is V2's
@pytest.mark.parametrize("name", [n for n in list_models() if get_variant(n).in_timm and get_variant(n).family == "v2"])
def test_pretrained_cfg_fields_equal_timms(name):
    """Against timm's 224 px ImageNet-1k fine-tuned record of the same variant (no model built: huge is 660 M)."""
    ref = timm.models.get_pretrained_cfg(f"{name}.fcmae_ft_in1k").to_dict()
    mine = pretrained_cfg(layout="timm")
    for key in CFG_FIELDS:
        assert tuple(mine[key]) == tuple(ref[key]) if isinstance(ref[key], tuple) else mine[key] == ref[key], key
    assert (mine["first_conv"], mine["classifier"]) == (ref["first_conv"], ref["classifier"])


def test_model_pretrained_cfg_resolves_like_timms_and_names_its_modules():
    ours, theirs = _pair("convnextv2_atto")
    cfg = ours.pretrained_cfg
    assert cfg == ours.default_cfg and cfg["num_classes"] == 1000
    from timm.data import resolve_data_config

    assert resolve_data_config(model=ours) == resolve_data_config(model=theirs)
    # the named modules are the same weights as timm's named ones
    for key in ("first_conv", "classifier"):
        a = ours.get_submodule(cfg[key]).weight
        b = theirs.get_submodule(theirs.pretrained_cfg[key]).weight
        assert a.shape == b.shape and torch.equal(a, b), key
    gray = build_convnextv2("convnextv2_test", num_classes=0, in_chans=1)
    assert gray.pretrained_cfg["input_size"] == (1, 224, 224) and gray.pretrained_cfg["num_classes"] == 0
    assert len(gray.pretrained_cfg["mean"]) == 1


def test_exported_timm_folder_config_is_the_same_record(tmp_path):
    ours, _ = _pair("convnextv2_atto")
    export_timm_folder(tmp_path / "out", dict(ours.state_dict()), "convnextv2_atto")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    record = json.loads(json.dumps(pretrained_cfg(3, 1000, layout="timm")))  # tuples as JSON lists
    assert config["pretrained_cfg"] == record
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True)
    for key in CFG_FIELDS:
        assert tuple(loaded.pretrained_cfg[key]) == tuple(ours.pretrained_cfg[key]) if isinstance(
            ours.pretrained_cfg[key], tuple) else loaded.pretrained_cfg[key] == ours.pretrained_cfg[key], key
