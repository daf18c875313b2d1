"""Every user error, through every command it applies to: exit status, one line on stderr naming the problem,
no traceback, nothing existing overwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.cli import main
from fcmae.weights.files import save_state_dict
from fcmae.weights.loader import create_model

TINY_PRE = ["model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
            "data.input_size=64", "data.limit=8", "data.num_workers=0", "optim.epochs=1", "run.batch_size=4",
            "run.progress=false", "run.mixed_precision=no"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    (root / "empty").mkdir()
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / "cls" / split / c).mkdir(parents=True)
            for i in range(4):
                a = np.full((40, 40), 60 + 100 * (c == "b"), np.uint8)
                Image.fromarray(a, mode="L").save(root / "cls" / split / c / f"{i}.png")
    (root / "garbage.safetensors").write_bytes(b"not a checkpoint at all")
    save_state_dict(root / "atto.safetensors", create_model("convnextv2_atto", num_classes=2).state_dict())
    save_state_dict(root / "test_enc.safetensors",
                    {k: v for k, v in create_model("convnextv2_test", num_classes=0).state_dict().items()
                     if not k.startswith("norm.")})
    (root / "a_file").write_text("I am a file")
    return root


def _ft(f: dict | Path, *extra: str) -> list[str]:
    return ["finetune", "model.name=convnextv2_test", "model.in_chans=1", "data.source=folder",
            f"data.train_path={f / 'cls' / 'train'}", f"data.val_path={f / 'cls' / 'val'}", "data.input_size=32",
            "data.num_workers=0", "run.batch_size=4", "optim.epochs=1", "run.progress=false",
            "run.mixed_precision=no", f"run.output_dir={f / 'ft_out'}", *extra]


# (id, argv builder, exit status, text the one line must contain)
CASES = [
    ("pretrain-bad-key", lambda f: ["pretrain", *TINY_PRE, "optim.blrr=1"], 2, "optim.blrr"),
    ("finetune-bad-key", lambda f: _ft(f, "optim.blrr=1"), 2, "optim.blrr"),
    ("pretrain-bad-value", lambda f: ["pretrain", *TINY_PRE, "run.batch_size=abc"], 2, "run.batch_size"),
    ("pretrain-log-every-0", lambda f: ["pretrain", *TINY_PRE, "run.log_every=0"], 2, "run.log_every"),
    ("pretrain-vis-0", lambda f: ["pretrain", *TINY_PRE, "run.num_vis_images=0"], 2, "run.num_vis_images"),
    ("pretrain-in-chans-2", lambda f: ["pretrain", *TINY_PRE, "model.in_chans=2"], 2, "model.in_chans"),
    ("pretrain-mask-ratio-0", lambda f: ["pretrain", *TINY_PRE, "model.mask_ratio=0"], 2,
     "removes no cell of the 2x2 mask grid"),
    ("pretrain-input-32", lambda f: ["pretrain", *TINY_PRE, "data.input_size=32"], 2,
     "the 1x1 mask grid of data.input_size=32"),
    ("pretrain-mask-ratio-0.99", lambda f: ["pretrain", *TINY_PRE, "model.mask_ratio=0.99"], 2,
     "would remove all 4 cells of the 2x2 mask grid"),
    ("verify-missing-run", lambda f: ["verify", str(f / "no_run")], 1, "no_run"),
    ("pretrain-workers-neg", lambda f: ["pretrain", *TINY_PRE, "data.num_workers=-1"], 2, "data.num_workers"),
    ("pretrain-save-neg", lambda f: ["pretrain", *TINY_PRE, "run.save_every_steps=-2"], 2, "run.save_every_steps"),
    ("finetune-bad-value", lambda f: _ft(f, "optim.layer_decay=2"), 2, "optim.layer_decay"),
    ("pretrain-unknown-option", lambda f: ["pretrain", *TINY_PRE, "--init", "x"], 2, "--init"),
    ("pretrain-missing-config", lambda f: ["pretrain", "nope/nothing.yaml"], 2, "nope/nothing.yaml"),
    ("pretrain-missing-data", lambda f: ["pretrain", *TINY_PRE, "data.source=folder", f"data.path={f / 'nope'}",
                                         f"run.output_dir={f / 'o1'}"], 1, "nope"),
    ("finetune-missing-data", lambda f: _ft(f, f"data.train_path={f / 'nope'}"), 1, "nope"),
    ("evaluate-missing-data", lambda f: ["evaluate", str(f / "atto.safetensors"), "--data", str(f / "nope")], 1,
     "nope"),
    ("pretrain-empty-data", lambda f: ["pretrain", *TINY_PRE, "data.source=folder", f"data.path={f / 'empty'}",
                                       f"run.output_dir={f / 'o2'}"], 1, "empty"),
    ("evaluate-empty-data", lambda f: ["evaluate", str(f / "atto.safetensors"), "--data", str(f / "empty")], 1,
     "empty"),
    ("pretrain-smaller-than-batch", lambda f: ["pretrain", *TINY_PRE, "data.limit=2", f"run.output_dir={f / 'o3'}"],
     1, "run.batch_size"),
    ("finetune-unreadable-init", lambda f: _ft(f, "--init", str(f / "garbage.safetensors")), 1,
     "garbage.safetensors"),
    ("evaluate-unreadable", lambda f: ["evaluate", str(f / "garbage.safetensors"), "--data", str(f / "cls")], 1,
     "garbage.safetensors"),
    ("visualize-unreadable", lambda f: ["visualize", str(f / "garbage.safetensors"), str(f / "cls")], 1,
     "garbage.safetensors"),
    ("convert-unreadable", lambda f: ["convert", str(f / "garbage.safetensors"), str(f / "x.safetensors")], 1,
     "garbage.safetensors"),
    ("finetune-missing-init", lambda f: _ft(f, "--init", str(f / "missing.pt")), 1, "missing.pt"),
    ("evaluate-missing-ckpt", lambda f: ["evaluate", str(f / "missing.pt"), "--data", str(f / "cls")], 1,
     "missing.pt"),
    ("visualize-missing-ckpt", lambda f: ["visualize", str(f / "missing_run"), str(f / "cls")], 1, "missing_run"),
    ("convert-missing", lambda f: ["convert", str(f / "missing.pt"), str(f / "x.safetensors")], 1, "missing.pt"),
    ("finetune-mismatched-init", lambda f: _ft(f, "--init", str(f / "atto.safetensors")), 1, "do not fit"),
    ("evaluate-no-head", lambda f: ["evaluate", str(f / "test_enc.safetensors"), "--data", str(f / "cls")], 1,
     "no classifier head"),
    ("pretrain-output-is-file", lambda f: ["pretrain", *TINY_PRE, f"run.output_dir={f / 'a_file'}"], 1, "a_file"),
    ("finetune-output-is-file", lambda f: _ft(f, f"run.output_dir={f / 'a_file'}"), 1, "a_file"),
    ("pretrain-bad-resume", lambda f: ["pretrain", *TINY_PRE, f"run.output_dir={f / 'o4'}",
                                       f"run.resume={f / 'no_ckpt'}"], 1, "no_ckpt"),
    ("finetune-bad-resume", lambda f: _ft(f, f"run.resume={f / 'no_ckpt'}"), 1, "no_ckpt"),
    ("evaluate-bad-batch", lambda f: ["evaluate", str(f / "atto.safetensors"), "--data", str(f / "cls"),
                                      "--batch-size", "0"], 1, "--batch-size"),
    ("visualize-no-images", lambda f: ["visualize", str(f / "atto.safetensors"), str(f / "empty")], 1, ""),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line(case, files, capsys):
    _, argv, status, needle = case
    before = (files / "a_file").read_text()
    torch_threads = torch.get_num_threads()
    code = main([str(a) for a in argv(files)])
    torch.set_num_threads(torch_threads)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == status, err
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert lines[0].startswith("fcmae ") and needle in lines[0], lines[0]
    assert (files / "a_file").read_text() == before


def test_code_running_pickles_are_refused_by_finetune_and_evaluate(files, tmp_path, capsys):
    from checkpoint_formats import assert_refuses_code_running_pickles

    assert_refuses_code_running_pickles(
        lambda ckpt: main(_ft(files, f"run.output_dir={tmp_path / 'ft'}", "--init", str(ckpt))), tmp_path, capsys)
    assert_refuses_code_running_pickles(
        lambda ckpt: main(["evaluate", str(ckpt), "--data", str(files / "cls")]), tmp_path, capsys)
