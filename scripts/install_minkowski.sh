#!/usr/bin/env bash
# Build and install MinkowskiEngine 0.5.4 (the optional backend of fcmae) into the active Python environment.
#
#   scripts/install_minkowski.sh            # idempotent: does nothing when `import MinkowskiEngine` already works
#
# Steps (facts behind them: MinkowskiEngine's setup.py imports torch at top level and probes BLAS through
# numpy.distutils unless told `--blas`, so neither pip's build isolation nor pip's own build can work):
#   1. Debian packages libopenblas-dev build-essential python3-dev (apt-get, when the CBLAS header is missing);
#   2. the 0.5.4 source distribution, fetched by name with `pip download --no-build-isolation` (metadata is
#      prepared in this environment, where torch imports; SETUPTOOLS_USE_DISTUTILS=stdlib keeps numpy's BLAS
#      probe working with setuptools >= 80), its sha256 checked;
#   3. patch `collections.Sequence` -> `collections.abc.Sequence` (removed in Python 3.10);
#   4. `python setup.py bdist_wheel --blas=openblas` (plus `--cpu_only` unless torch sees CUDA), MAX_JOBS=2;
#   5. `pip install --no-deps` the wheel. The wheel is cached under ~/.cache/fcmae/minkowski/, keyed by the
#      MinkowskiEngine, torch and Python versions, so a rerun (or a fresh venv with the same torch) takes seconds.
#
# Environment: PYTHON (default: `python` on PATH), MAX_JOBS (default 2), FCMAE_CACHE_DIR (default ~/.cache/fcmae).
set -euo pipefail

ME_VERSION=0.5.4
ME_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
PY="${PYTHON:-python}"
PY="$(command -v "$PY")" || { echo "install_minkowski: no python on PATH (activate the venv first)" >&2; exit 1; }
log() { echo "[install_minkowski] $*" >&2; }

# the interpreter's own bin first: setup.py shells out to `pip`, torch's extension builder looks for `ninja`
BIN_DIR="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')"
export PATH="$BIN_DIR:$PATH"
export MAX_JOBS="${MAX_JOBS:-2}"

me_works() {
    # from a neutral directory, so that a source tree in the cwd is not what gets imported
    (cd / && "$PY" -c 'import MinkowskiEngine as ME; assert ME.__version__ == "'"$ME_VERSION"'"' >/dev/null 2>&1)
}

if me_works; then
    log "MinkowskiEngine $ME_VERSION already imports with this torch; nothing to do"
    exit 0
fi

read -r TORCH_VERSION PY_TAG HAS_CUDA < <("$PY" -c '
import sys, torch
print(torch.__version__, f"cp{sys.version_info[0]}{sys.version_info[1]}", int(torch.cuda.is_available()))')
FLAVOUR=$([ "$HAS_CUDA" = 1 ] && echo cuda || echo cpu)
CACHE_DIR="${FCMAE_CACHE_DIR:-$HOME/.cache/fcmae}/minkowski/me$ME_VERSION-torch$TORCH_VERSION-$PY_TAG-$FLAVOUR"

install_cached_wheel() {
    local whl
    whl="$(ls "$CACHE_DIR"/*.whl 2>/dev/null | head -n 1)" || return 1
    [ -n "$whl" ] || return 1
    log "installing cached wheel $whl"
    "$PY" -m pip install --no-deps --force-reinstall --quiet "$whl" && me_works
}

if install_cached_wheel; then
    log "done (cached wheel)"
    exit 0
fi

# 1. system packages: a CBLAS (OpenBLAS) and a C++ toolchain
if [ ! -e /usr/include/x86_64-linux-gnu/cblas.h ] && [ ! -e /usr/include/cblas.h ] \
        || ! command -v g++ >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { log "need OpenBLAS headers and g++, and apt-get is missing"; exit 1; }
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    log "apt-get install libopenblas-dev build-essential python3-dev"
    $SUDO apt-get install -y libopenblas-dev build-essential python3-dev >/dev/null 2>&1 \
        || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y libopenblas-dev build-essential python3-dev >/dev/null; }
fi

# 2. build tools in the environment (setup.py runs without build isolation)
"$PY" -c 'import numpy, setuptools, wheel' 2>/dev/null || "$PY" -m pip install --quiet numpy setuptools wheel
command -v ninja >/dev/null 2>&1 || "$PY" -m pip install --quiet ninja

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
log "fetching MinkowskiEngine==$ME_VERSION (source distribution)"
printf 'MinkowskiEngine==%s --hash=sha256:%s\n' "$ME_VERSION" "$ME_SHA256" > "$WORK/requirements.txt"
(cd "$WORK" && SETUPTOOLS_USE_DISTUTILS=stdlib "$PY" -m pip download --quiet --no-deps --no-binary :all: \
    --no-build-isolation --require-hashes -r requirements.txt -d "$WORK/dl") \
    || { log "could not fetch the source (Python >= 3.12 lacks the stdlib distutils this step relies on)"; exit 1; }
SDIST="$(ls "$WORK"/dl/*.tar.gz)"
echo "$ME_SHA256  $SDIST" | sha256sum --check --quiet - || { log "sha256 mismatch for $SDIST"; exit 1; }

# 3. unpack and patch for Python >= 3.10
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/MinkowskiEngine-$ME_VERSION"
for f in "$SRC"/MinkowskiEngine/*.py "$SRC"/MinkowskiEngine/utils/*.py; do
    sed -i -e 's/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
        -e 's/^from collections import Sequence$/from collections.abc import Sequence/' "$f"
done
if grep -rn '^from collections import .*Sequence' "$SRC/MinkowskiEngine" >&2; then
    log "patch incomplete (lines above)"; exit 1
fi

# 4. build the wheel for this torch
FLAGS=(--blas=openblas)
[ "$FLAVOUR" = cpu ] && FLAGS+=(--cpu_only)
mkdir -p "$CACHE_DIR"
BUILD_LOG="$CACHE_DIR/build.log"
log "building ($FLAVOUR, MAX_JOBS=$MAX_JOBS; about 5 minutes on 2 idle cores; log: $BUILD_LOG)"
START=$SECONDS
(cd "$SRC" && "$PY" setup.py bdist_wheel "${FLAGS[@]}" > "$BUILD_LOG" 2>&1) \
    || { tail -n 40 "$BUILD_LOG" >&2; log "build failed"; exit 1; }
log "built in $((SECONDS - START)) s"

# 5. cache and install
cp "$SRC"/dist/*.whl "$CACHE_DIR/"
install_cached_wheel || { log "the built wheel does not import"; exit 1; }
log "done"
