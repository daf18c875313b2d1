"""Process-level runtime settings: the allocator tuning that makes CPU training up to ~2x faster.

glibc serves every buffer over 32 MiB with a fresh ``mmap`` and unmaps it on free, so each training step
page-faults all of its large activations again (hundreds of thousands of faults per step on CPU). Disabling
mmap for large blocks and never trimming the heap keeps those pages mapped between steps. The setting must
be in the environment before the process starts, so entry points re-execute themselves once with it.
"""

from __future__ import annotations

import os
import sys

MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
_GUARD = "FCMAE_MALLOC_TUNED"


def malloc_tuned() -> bool:
    """True when this process runs with our glibc malloc tunables."""
    return MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


def tuned_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: ``os.environ``) with the malloc tunables added (children inherit them)."""
    env = dict(os.environ if env is None else env)
    current = env.get("GLIBC_TUNABLES", "")
    if MALLOC_TUNABLES not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES
    env[_GUARD] = "1"
    return env


def reexec_with_malloc_tuning(argv: list[str] | None = None) -> None:
    """Re-execute the current Python command with the tunables set, unless already set or disabled.

    Disabled with ``FCMAE_NO_MALLOC_TUNING=1``; only on Linux (glibc). Never loops: a guard variable is set.
    """
    if not sys.platform.startswith("linux") or malloc_tuned() or os.environ.get(_GUARD):
        return
    if os.environ.get("FCMAE_NO_MALLOC_TUNING"):
        return
    args = [sys.executable, *(sys.orig_argv[1:] if argv is None and hasattr(sys, "orig_argv") else (argv or []))]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, tuned_env())
