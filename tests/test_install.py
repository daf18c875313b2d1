"""The README's install lines, read from the README itself so they cannot drift: a venv first, then the CPU-only
line (torch and torchvision together, pinned to a matching pair, from PyPI's CPU index) before the command a
newcomer copies, the GPU line beside it, the measured venv sizes, and the same pins as CI installs.

A slow test follows the CPU path in a fresh venv and asks pip what the project's install would add: no ``nvidia-*``
package and no other torch. Where download.pytorch.org does not answer (this project's machines), it follows the
same path with a CPU torch wheel found on disk, and shows that torch alone would not have been enough.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def quick_start() -> list[str]:
    """The lines of the Quick start's shell block (comments included)."""
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, "the Quick start has no ```bash block"
    return block[1].splitlines()


def commands() -> list[list[str]]:
    """Each command of the Quick start block as argv (``&&`` splits a line)."""
    out = []
    for line in quick_start():
        if line.strip() and not line.lstrip().startswith("#"):
            out.extend(shlex.split(part) for part in line.split("&&"))
    return out


def pins(cmd: list[str]) -> dict[str, Version]:
    """The ``name==version`` requirements of a ``pip install`` command -> {name: version} (options skipped)."""
    out, args = {}, iter(cmd[2:])
    for a in args:
        if a in ("--index-url", "-i", "--extra-index-url", "-c", "-r"):
            next(args, None)  # the option's value
        elif not a.startswith("-") and "==" in a:
            r = Requirement(a)
            out[r.name] = Version(next(iter(r.specifier)).version)
    return out


def cpu_command() -> list[str]:
    found = [c for c in commands() if c[:2] == ["pip", "install"] and CPU_INDEX in c]
    assert len(found) == 1, f"expected one `pip install ... --index-url {CPU_INDEX}` line, found {found}"
    return found[0]


def test_quick_start_begins_with_a_venv():
    first = commands()[0]
    assert first[1:3] == ["-m", "venv"], first
    assert any(c[:2] in (["."], ["source"]) or c[0] in (".", "source") for c in commands()[:2])


def test_cpu_line_installs_torch_and_torchvision_together_from_the_cpu_index():
    cmd = cpu_command()
    i = cmd.index("--index-url")
    assert cmd[i + 1] == CPU_INDEX and "--extra-index-url" not in cmd  # one index for both
    p = pins(cmd)
    assert set(p) == {"torch", "torchvision"}, cmd
    torch_v, tv_v = p["torch"], p["torchvision"]
    # torchvision 0.(N+15).x is built for torch 2.N.x
    assert (tv_v.major, tv_v.minor, tv_v.micro) == (0, torch_v.minor + 15, torch_v.micro), (torch_v, tv_v)
    deps = {Requirement(d).name: Requirement(d) for d in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, version in p.items():  # the project's install keeps them: they satisfy its ranges
        assert deps[name].specifier.contains(version), (name, version, deps[name])


def test_cpu_line_comes_before_the_project_install_and_the_gpu_line_is_beside_it():
    lines = quick_start()
    cpu = next(i for i, s in enumerate(lines) if CPU_INDEX in s and not s.lstrip().startswith("#"))
    project = next(i for i, s in enumerate(lines) if 'pip install -e ".[dev]"' in s)
    assert cpu < project
    comments = [s.lower() for s in lines if s.lstrip().startswith("#")]
    assert any("cpu" in c for c in comments) and any("gpu" in c for c in comments)
    for c in comments[:2]:  # each path states the venv size measured for it
        assert re.search(r"venv [~\d.,]+ ?[GM]B", c, flags=re.I), c


def test_ci_installs_the_readme_pins():
    """One pair of versions: what CI installs is what the README tells a CPU user to install."""
    ci = (ROOT / ".ci" / "run").read_text()
    for name, version in pins(cpu_command()).items():
        assert f'"{name}=={version}"' in ci, (name, version)


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def _added(pip: list[str], report: Path) -> list[str]:
    """What ``pip install -e ROOT[dev]`` would add to the venv of ``pip`` (its dry-run report), lower-case names."""
    subprocess.run([*pip, "install", "--dry-run", "--report", str(report), "-e", f"{ROOT}[dev]"], check=True,
                   timeout=900, capture_output=True)
    return [i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]]


def _cuda_parts(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("nvidia") or n in ("torch", "torchvision", "triton")]


def _local_cpu_torch() -> Path | None:
    """A CPU build of torch on this machine's disk (``FCMAE_CPU_TORCH_WHEEL``, else the image's wheel folder)."""
    import os

    given = os.environ.get("FCMAE_CPU_TORCH_WHEEL")
    found = [Path(given)] if given else sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl"))
    return found[-1] if found and found[-1].is_file() else None


@pytest.mark.slow
def test_cpu_path_in_a_fresh_venv_gets_no_nvidia_packages(tmp_path):
    """The README's CPU line in a fresh venv, then what the project's install would add: no ``nvidia-*``, no
    other torch. Where download.pytorch.org cannot be reached but a CPU torch wheel lies on disk, the same path
    with that pair instead (torch from the wheel, torchvision 0.(N+15).x by the README's rule from the default
    index), checked both ways: torch alone lets the project's install bring CUDA torch and nvidia-* (the failure
    the README's line prevents, so the check can fail), torch and torchvision together do not."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    cmd = cpu_command()
    if _reachable("download.pytorch.org"):
        subprocess.run([*pip, *cmd[1:]], check=True, timeout=1800, capture_output=True)
        assert not _cuda_parts(_added(pip, tmp_path / "report.json"))
        return
    wheel = _local_cpu_torch()
    if wheel is None:
        pytest.skip("download.pytorch.org cannot be reached from this machine and no CPU torch wheel lies on disk: "
                    "the CPU path cannot be followed")
    torch_v = Version(wheel.name.split("-")[1].split("+")[0])
    subprocess.run([*pip, "install", str(wheel)], check=True, timeout=1800, capture_output=True)
    alone = _cuda_parts(_added(pip, tmp_path / "alone.json"))
    assert "torch" in alone and any(n.startswith("nvidia") for n in alone), alone  # the trap is real
    tv = f"torchvision==0.{torch_v.minor + 15}.{torch_v.micro}"  # (torch 2.N's torchvision)
    subprocess.run([*pip, "install", str(wheel), tv], check=True, timeout=1800, capture_output=True)
    assert not _cuda_parts(_added(pip, tmp_path / "report.json"))
