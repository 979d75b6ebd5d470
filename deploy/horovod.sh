#!/usr/bin/env bash
# Builds Horovod 0.28.1 once per (horovod, torch, python, GPU) combination, caches the wheel, and
# installs it into a virtual environment.
#
#   bash deploy/horovod.sh [VENV]          # VENV defaults to this repository's .venv
#
# Why a script: Horovod is source-only on PyPI and its last release (0.28.1, 2023) no longer builds
# against current torch as published. Two edits make it build: C++17 instead of C++14 in
# CMakeLists.txt and horovod/torch/CMakeLists.txt (torch's headers need C++17), and
# CMAKE_POLICY_VERSION_MINIMUM=3.5 in the environment (cmake 4 refuses gloo's old minimum). The build
# takes minutes, so the wheel is cached (default ~/.cache/shipyard/wheels, or SHIPYARD_WHEEL_CACHE):
# a second run, or CI on the same machine, only installs the cached wheel.
#
# CPU build (default): Gloo controller and Gloo CPU collectives, no MPI, no TensorFlow/MXNet.
# GPU build: set HOROVOD_GPU_OPERATIONS=NCCL (and HOROVOD_NCCL_INCLUDE / HOROVOD_NCCL_LIB, or
# HOROVOD_NCCL_HOME, when NCCL is not where the compiler looks). GCC 13 needs
# CXXFLAGS="-include string -include cstdint -include stdexcept", which the script adds.
#
# Offline machines: put horovod-0.28.1.tar.gz into "$SHIPYARD_WHEEL_CACHE/sdist/" (or carry the
# cached wheel itself); the download step is skipped when the sdist is there.
set -euo pipefail

HOROVOD_VERSION=0.28.1
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$(cd "${1:-$REPO/.venv}" && pwd)
PY="$VENV/bin/python"
CACHE=${SHIPYARD_WHEEL_CACHE:-$HOME/.cache/shipyard/wheels}

STEP="start"
LOG=""
fail() {
  local rc=$?
  echo "deploy/horovod.sh: FAILED at step: $STEP (exit $rc)" >&2
  if [ -n "$LOG" ] && [ -f "$LOG" ]; then
    echo "---- last 60 lines of $LOG ----" >&2
    tail -n 60 "$LOG" >&2
    echo "---- full log: $LOG ----" >&2
  fi
  exit "$rc"
}
trap fail ERR

STEP="inspect $VENV"
[ -x "$PY" ] || { echo "deploy/horovod.sh: no python at $PY (run deploy/install.sh first)" >&2; exit 2; }
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
PY_VERSION=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "${HOROVOD_GPU_OPERATIONS:-}" = "NCCL" ]; then GPU=nccl; else GPU=cpu; fi
KEY="horovod-${HOROVOD_VERSION}_torch-${TORCH_VERSION}_py-${PY_VERSION}_${GPU}"
WHEEL_DIR="$CACHE/$KEY"
mkdir -p "$CACHE/sdist"
LOG="$CACHE/$KEY.build.log"

# One build at a time per cache (CI jobs on one machine share it); the loser then finds the wheel.
exec 9>"$CACHE/.$KEY.lock"
flock 9

wheel() { compgen -G "$WHEEL_DIR/horovod-${HOROVOD_VERSION}-*.whl" | head -n 1; }

if [ -z "$(wheel || true)" ]; then
  echo "deploy/horovod.sh: building $KEY (several minutes; log: $LOG)"
  : >"$LOG"
  T0=$(date +%s)
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/shipyard-horovod.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT

  SDIST="$CACHE/sdist/horovod-${HOROVOD_VERSION}.tar.gz"
  if [ ! -f "$SDIST" ]; then
    STEP="download the horovod ${HOROVOD_VERSION} sdist from PyPI"
    "$PY" -m pip download --no-deps --no-binary :all: "horovod==${HOROVOD_VERSION}" -d "$WORK/dl" >>"$LOG" 2>&1
    mv "$WORK/dl/horovod-${HOROVOD_VERSION}.tar.gz" "$SDIST.part" && mv "$SDIST.part" "$SDIST"
  fi

  STEP="unpack $SDIST"
  tar -xzf "$SDIST" -C "$WORK" >>"$LOG" 2>&1
  SRC="$WORK/horovod-${HOROVOD_VERSION}"

  for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
    STEP="edit $f: set(CMAKE_CXX_STANDARD 14) -> 17"
    [ "$(grep -c '^ *set(CMAKE_CXX_STANDARD 14)$' "$SRC/$f")" = 1 ]
    sed -i 's/^\( *\)set(CMAKE_CXX_STANDARD 14)$/\1set(CMAKE_CXX_STANDARD 17)/' "$SRC/$f"
    grep -q '^ *set(CMAKE_CXX_STANDARD 17)$' "$SRC/$f"
  done

  # --no-build-isolation: the extension must compile against the torch in $VENV, not a fresh one.
  STEP="install build tools (setuptools, wheel) into $VENV"
  "$PY" -m pip install -q setuptools wheel >>"$LOG" 2>&1
  if ! command -v cmake >/dev/null 2>&1 && [ ! -x "$VENV/bin/cmake" ]; then
    STEP="install cmake from PyPI into $VENV"
    "$PY" -m pip install -q cmake >>"$LOG" 2>&1
  fi

  BUILD_ENV=(
    PATH="$VENV/bin:$PATH"
    CMAKE_POLICY_VERSION_MINIMUM=3.5
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    HOROVOD_CPU_OPERATIONS=GLOO
  )
  if [ "$GPU" = nccl ]; then
    BUILD_ENV+=(HOROVOD_GPU_OPERATIONS=NCCL CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-include string -include cstdint -include stdexcept")
    for v in HOROVOD_NCCL_HOME HOROVOD_NCCL_INCLUDE HOROVOD_NCCL_LIB HOROVOD_NCCL_LINK HOROVOD_CUDA_HOME HOROVOD_BUILD_CUDA_CC_LIST; do
      if [ -n "${!v:-}" ]; then BUILD_ENV+=("$v=${!v}"); fi
    done
  fi
  echo "build environment: ${BUILD_ENV[*]}" >>"$LOG"

  STEP="build the horovod wheel (pip wheel --no-build-isolation; compiler output in the log)"
  env "${BUILD_ENV[@]}" "$PY" -m pip wheel -v --no-deps --no-build-isolation -w "$WORK/wheel" "$SRC" >>"$LOG" 2>&1

  STEP="store the wheel in $WHEEL_DIR"
  mkdir -p "$WHEEL_DIR.part"
  mv "$WORK"/wheel/horovod-*.whl "$WHEEL_DIR.part/"
  rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.part" "$WHEEL_DIR"
  echo "deploy/horovod.sh: built $(basename "$(wheel)") in $(( $(date +%s) - T0 ))s"
fi

STEP="pip install the cached wheel $(wheel) into $VENV"
"$PY" -m pip install -q "$(wheel)" >>"$LOG" 2>&1

STEP="import horovod.torch and check what it was built with (Gloo; NCCL for a GPU build)"
"$PY" - "$GPU" >>"$LOG" 2>&1 <<'CHECK'
import sys
import horovod.torch as hvd
assert hvd.gloo_built(), "horovod was built without Gloo"
assert sys.argv[1] != "nccl" or hvd.nccl_built(), "HOROVOD_GPU_OPERATIONS=NCCL, but horovod was built without NCCL"
CHECK
echo "deploy/horovod.sh: horovod $HOROVOD_VERSION ($GPU) installed in $VENV from $WHEEL_DIR"
