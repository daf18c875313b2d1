"""The command line as a tool: fast start (no torch for help, usage and config errors), --version, one flag
vocabulary across commands, --print-config, whole-run progress lines, the metrics/summary schema across a resume,
and the small traps (visualize on an encoder, convert over an existing file, figure titles, the demo's lr)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from cluster_tools import child_env
from PIL import Image

from fcmae.cli import COMMANDS, build_parser, main
from fcmae.commands._flags import FLAGS

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "torchvision", "accelerate")


def _fcmae(*args: str, importtime: bool = False, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "fcmae", *args]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _imported(stderr: str) -> set[str]:
    """Top-level modules named by ``-X importtime`` output."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", stderr, flags=re.M)}


# ------------------------------------------------------------------------------------------- fast start
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["pretrain", "--help"], ["finetune", "--help"],
                                  ["evaluate", "--help"], ["probe", "--help"], ["diagnose", "--help"],
                                  ["visualize", "--help"], ["convert", "--help"]])
def test_help_and_version_import_no_torch(argv):
    r = _fcmae(*argv, importtime=True)
    assert r.returncode == 0, r.stderr[-2000:]
    mods = _imported(r.stderr)
    assert "fcmae" in mods and not mods & set(HEAVY), sorted(mods & set(HEAVY))
    if argv == ["--version"]:
        import fcmae

        assert r.stdout.strip() == f"fcmae {fcmae.__version__}"


@pytest.mark.parametrize("argv, needle", [
    (["pretrain", "demo", "data.limit=-1"], "data.limit=-1 must be >= 0"),
    (["finetune", "finetune/fashion_mnist", "--batch-size", "0"], "run.batch_size=0 must be >= 1"),
    (["pretrain", "demo", "--bogus"], "unknown option --bogus"),
    (["pretrain"], "no config given: name one, e.g. `fcmae pretrain demo` or `fcmae pretrain pretrain/convnextv2_atto"),
    (["evaluate", "x.safetensors", "--data", "d", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_config_and_usage_errors_are_one_line_without_torch(argv, needle):
    r = _fcmae(*argv, importtime=True)
    lines = [x for x in r.stderr.splitlines() if not x.startswith("import time:")]
    assert r.returncode in (1, 2) and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
    assert not _imported(r.stderr) & set(HEAVY)


def test_parsing_and_config_loading_leave_torch_unimported():
    code = ("import sys; from fcmae.cli import build_parser; from fcmae.commands._flags import load_command_config;"
            "from fcmae.commands.pretrain import FLAGS; from fcmae.config import PretrainConfig;"
            "a = build_parser().parse_args(['pretrain', 'demo', '--batch-size', '8']);"
            "c = load_command_config(PretrainConfig, a, FLAGS); assert c.run.batch_size == 8;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'accelerate')))")
    r = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# ------------------------------------------------------------------------------------------- one vocabulary
TRAIN = ("pretrain", "finetune")
APPLIES = {  # shared flag -> the commands it applies to
    "out": (*TRAIN, "diagnose", "visualize", "shard"),
    "batch_size": (*TRAIN, "evaluate", "probe", "diagnose"),
    "seed": (*TRAIN, "probe", "diagnose", "visualize", "shard"),
    "mixed_precision": (*TRAIN, "evaluate", "probe", "diagnose"),
    "limit": (*TRAIN, "evaluate", "probe", "diagnose", "visualize"),
    "num_workers": (*TRAIN, "evaluate", "probe", "diagnose"),
    "input_size": (*TRAIN, "evaluate", "probe", "diagnose", "visualize"),
    "no_progress": (*TRAIN, "evaluate", "probe", "diagnose", "shard"),
    "random_init": ("probe", "diagnose"),
    "random_init_no_grn": ("probe", "diagnose"),
    "overwrite": (*TRAIN, "convert"),
    "resume": TRAIN,
    "max_steps": TRAIN,
    "init": ("finetune",),
}
VALUES = {"out": "/tmp/elsewhere", "batch_size": "6", "seed": "5", "mixed_precision": "bf16", "limit": "7",
          "num_workers": "3", "input_size": "64", "max_steps": "9", "resume": "auto", "random_init": "atto",
          "random_init_no_grn": "atto", "init": "w.safetensors"}
# what the flag sets in a training config
KEYS = {"out": [("run.output_dir", "/tmp/elsewhere")], "batch_size": [("run.batch_size", 6)],
        "seed": [("run.seed", 5)], "mixed_precision": [("run.mixed_precision", "bf16")],
        "limit": [("data.limit", 7)], "num_workers": [("data.num_workers", 3)], "input_size": [("data.input_size", 64)],
        "no_progress": [("run.progress", False)], "overwrite": [("run.overwrite", True)],
        "max_steps": [("run.max_steps", 9)], "resume": [("run.resume", "auto")],
        "init": [("model.init", "w.safetensors")]}
MINIMAL = {"pretrain": ["demo"], "finetune": ["finetune/fashion_mnist"], "evaluate": ["w.safetensors", "--data", "d"],
           "probe": ["--train", "d", "--val", "d"], "diagnose": ["--data", "d", "--out", "o"],
           "visualize": ["run", "img.png"], "convert": ["a", "b"], "shard": ["src", "out"]}


def _action(command: str, dest: str) -> argparse.Action:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = [a for a in sub.choices[command]._actions if a.dest == dest and a.help != argparse.SUPPRESS]
    assert len(found) == 1, (command, dest, found)
    return found[0]


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


@pytest.mark.parametrize("flag, command", [(f, c) for f, cs in APPLIES.items() for c in cs])
def test_shared_flag_same_spelling_meaning_and_stated_default(flag, command, capsys):
    f = FLAGS[flag]
    action = _action(command, flag)
    assert action.option_strings == list(f.names) and action.help.startswith(f.meaning)
    if not f.switch:
        assert "(default: " in action.help
    argv = [*f.names[:1]] + ([] if f.switch else [VALUES[flag]])
    if command in TRAIN:  # the meaning, read back from the merged config; the flag before or after CONFIG
        for order in ([command, *argv, *MINIMAL[command]], [command, *MINIMAL[command], *argv]):
            assert main([*order, "--print-config"], reexec=False) == 0, capsys.readouterr().err
            cfg = yaml.safe_load(capsys.readouterr().out)
            keys = KEYS[flag] + ([("data.val_limit", 7)] if flag == "limit" and command == "finetune" else [])
            for key, want in keys:
                assert _get(cfg, key) == want, (order, key)
    else:
        args = build_parser().parse_args([command, *MINIMAL[command], *argv])
        want = True if f.switch else f.type(VALUES[flag])
        got = getattr(args, flag)
        assert (got == [want]) if isinstance(got, list) else (got == want)


def test_every_command_is_covered_and_commands_only_use_the_shared_spellings():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    spellings = {n: name for name, f in FLAGS.items() for n in f.names}
    for command in COMMANDS:
        for a in sub.choices[command]._actions:
            for opt in a.option_strings:
                if opt in spellings and a.help != argparse.SUPPRESS:
                    assert command in APPLIES[spellings[opt]], (command, opt)


def _class_folder(root: Path, per_class: int = 6) -> Path:
    for c, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((32, 32), 40 * c + 3 * i, dtype=np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_limit_means_the_same_images_in_evaluate_and_probe(tmp_path, capsys):
    from fcmae import create_model
    from fcmae.weights.files import save_state_dict

    data = _class_folder(tmp_path / "data")
    weights = tmp_path / "clf.safetensors"
    save_state_dict(weights, create_model("convnextv2_test", num_classes=3, in_chans=1).state_dict(),
                    {"variant": "convnextv2_test"})
    common = ["--input-size", "32", "--limit", "9", "--num-workers", "0", "--no-progress", "--batch-size", "4"]
    assert main(["evaluate", str(weights), "--data", str(data), *common, "--json", str(tmp_path / "e.json")],
                reexec=False) == 0, capsys.readouterr().err
    assert main(["probe", "--raw-pixels", "--train", str(data), "--val", str(data), "--in-chans", "1", *common,
                 "--knn-k", "1", "--no-linear", "--json", str(tmp_path / "p.json")], reexec=False) == 0
    e, p = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ep")
    assert e["images"] == p["val_images"] == p["train_pool"] == 9


# ------------------------------------------------------------------------------------------- progress, outputs
TINY = ["demo", "model.name=convnextv2_test", "model.decoder_embed_dim=32", "data.input_size=64", "data.limit=48",
        "data.num_workers=0", "--batch-size", "4", "optim.epochs=2", "run.log_every=4", "run.save_every_steps=5",
        "run.export_every_epochs=0", "run.threads=1", "run.num_vis_images=2"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_progress_lines_and_outputs_schema_across_a_resume(tmp_path):
    out = tmp_path / "run"
    first = _fcmae("pretrain", *TINY, "--out", str(out), "--max-steps", "13", "--resume", "auto")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "\r" not in first.stderr  # stderr is a pipe: no bar, plain lines
    assert "run.resume=auto: no complete checkpoint" in first.stderr and "starting fresh" in first.stderr
    progress = [x for x in first.stderr.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in progress] == ["4/13", "8/13", "12/13", "13/13"]  # one per log window + the last
    assert all(re.search(r" eta (\d+:)?\d+:\d\d$", x) and " loss " in x and " img/s " in x for x in progress)
    assert re.search(r"^epoch 1/2 done: step 12/13", first.stderr, flags=re.M)
    s1 = json.loads((out / "summary.json").read_text())
    assert s1["status"] == "stopped" and s1["steps"] == 13

    second = _fcmae("pretrain", *TINY, "--out", str(out), "--resume", "auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "\r" not in second.stderr
    recs = _records(out)
    assert {r["type"] for r in recs} <= {"train", "eval", "monitor", "summary"}
    assert all(isinstance(r["timestamp"], float) and r["timestamp"] > 1.6e9 for r in recs)
    times = [r["time_s"] for r in recs]
    assert times == sorted(times) and times[0] > 0  # continuous across the resume (no restart at 0)
    train = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12, 13, 16, 20, 24]  # every step once (resumed from step 10)
    assert [r["type"] for r in recs].count("summary") == 1 and recs[-1]["type"] == "summary"
    s = json.loads((out / "summary.json").read_text())
    assert recs[-1]["summary"] == s
    assert s["status"] == "finished" and s["steps"] == s["total_steps"] == 24
    assert s["final_loss"] == train[-1]["loss"]
    assert s["time_s"] >= train[-1]["time_s"] > s["wall_s"]  # the whole run's time vs this invocation's
    import fcmae

    assert s["fcmae_version"] == fcmae.__version__ and s["config"]["run"]["batch_size"] == 4
    for key in ("output_dir", "checkpoint", "metrics", "summary", "encoder", "figure"):
        assert Path(s[key]).is_absolute() and Path(s[key]).exists(), key
    cfg_text = (out / "config.yaml").read_text()
    assert cfg_text.startswith("# used: effective batch 4, lr 0.0001875 (= blr 0.012 x 4 / 256)")


def test_strict_json_writes_null_for_non_finite():
    from fcmae.weights.files import strict_json

    out = strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    assert out == '{"a": null, "b": [1.0, null], "c": "x"}'


def test_demo_config_tells_one_learning_rate_story():
    from fcmae.config import PretrainConfig, load_config
    from fcmae.train.trainer import scaled_lr

    cfg = load_config(PretrainConfig, "demo")
    assert cfg.optim.lr is None  # blr only, scaled by the batch
    assert scaled_lr(cfg.optim.blr, cfg.run.batch_size) == pytest.approx(1.5e-3)  # the lr it always trained with


# ------------------------------------------------------------------------------------------- small traps
def test_visualize_refuses_an_encoder_or_a_classifier_in_one_line(tmp_path, capsys):
    from fcmae import create_model
    from fcmae.weights.files import save_state_dict

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(img)
    enc = tmp_path / "run" / "encoder.safetensors"
    save_state_dict(enc, create_model("convnextv2_test", num_classes=0).state_dict(),
                    {"format": "fcmae-encoder", "variant": "convnextv2_test"})
    clf = tmp_path / "ft" / "last.safetensors"
    save_state_dict(clf, create_model("convnextv2_test", num_classes=3).state_dict(), {"variant": "convnextv2_test"})
    for path, what in ((enc, "the exported encoder alone"), (clf, "a classifier")):
        assert main(["visualize", str(path), str(img)], reexec=False) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and what in err and "pretraining run folder" in err, err


def test_reconstruction_figure_has_column_titles():
    import torch

    from fcmae.evaluation.figures import TITLES, reconstruction_grid
    from fcmae.models.fcmae import create_fcmae
    from fcmae.models.masking import random_masking

    model = create_fcmae("convnextv2_test", in_chans=1, decoder_embed_dim=16)
    imgs = torch.full((2, 1, 64, 64), 0.0)
    grid = np.asarray(reconstruction_grid(model, imgs, random_masking(2, (2, 2), 0.5), (0.5,), (0.5,)))
    assert TITLES == ("original", "masked", "reconstruction", "reconstruction + visible")
    cell = 64 * 3  # scaled up to at least 160 px
    header = grid[:16]  # the title strip: dark text on white above every column
    for j in range(4):
        col = header[:, 4 + j * (cell + 4): 4 + j * (cell + 4) + cell]
        assert (col < 128).any(), j


def test_convert_refuses_to_replace_out_unless_overwrite(tmp_path, capsys):
    from fcmae import create_model
    from fcmae.weights.files import save_state_dict

    src = tmp_path / "in.safetensors"
    save_state_dict(src, create_model("convnextv2_test", num_classes=0).state_dict())
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(src), str(out)], reexec=False) == 1
    err = capsys.readouterr().err
    assert "exists; give --overwrite" in err and out.read_bytes() == b"keep me"
    assert main(["convert", str(src), str(out), "--overwrite"], reexec=False) == 0
    assert out.read_bytes() != b"keep me"


def test_a_non_finite_loss_leaves_a_failed_summary(tmp_path):
    import torch

    from fcmae.config import PretrainConfig, load_config
    from fcmae.train.pretraining import run_pretraining
    from fcmae.train.trainer import NonFiniteLossError

    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, [
        "model.name=convnextv2_test", "model.decoder_embed_dim=32", "model.in_chans=1", "data.source=demo",
        "data.input_size=64", "data.limit=16", "data.num_workers=0", "optim.steps=8", "optim.warmup_steps=1",
        "run.batch_size=2", "run.log_every=2", "run.export_every_epochs=0", "run.progress=false", "run.threads=1",
        f"run.output_dir={out}"])

    def poison(trainer) -> None:
        if trainer.state.step == 3:
            with torch.no_grad():
                trainer.unwrapped.encoder.downsample_layers[0][0].weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError):
        run_pretraining(cfg, hooks=[poison])
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and "non-finite loss at step 3" in s["error"] and s["steps"] == 4
    recs = _records(out)  # strict JSON: json.loads would take NaN, so look for it in the text too
    assert "NaN" not in (out / "metrics.jsonl").read_text() and recs[-1]["type"] == "summary"
