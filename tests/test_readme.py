"""The README's Python example runs as written, and its commands name real files and subcommands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_commands_reference_existing_files_and_subcommands():
    from fcmae.cli import COMMANDS

    cmds = re.findall(r"\bfcmae (\w+) ", README)
    assert "pretrain" in cmds
    for cmd in cmds:
        assert cmd in COMMANDS, cmd
    for script in re.findall(r"accelerate launch .*? (\w+\.py) ", README.replace("\\\n", " ")):
        assert (ROOT / script).is_file(), script
    for cfg in set(re.findall(r"(configs/[\w/]+\.yaml)", README)):
        assert (ROOT / cfg).is_file(), cfg
    assert "python -m pytest -q" in README


def test_readme_lists_every_command_of_the_help():
    """The README's command list names exactly the commands ``fcmae --help`` shows."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "fcmae", "--help"], capture_output=True, text=True, timeout=120,
                         env=env, check=True).stdout
    shown = re.findall(r"^ {4}(\w+)(?:\s|$)", out, flags=re.M)
    listed = re.search(r"`fcmae --help` lists the commands \(([^)]*)\)", README.replace("\n", " "))
    assert listed, "the README does not list the commands"
    assert re.findall(r"`(\w+)`", listed[1]) and set(re.findall(r"`(\w+)`", listed[1])) == set(shown), shown
