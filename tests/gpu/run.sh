#!/usr/bin/env bash
# The GPU proof (tests/gpu/proof.py, docs/gpu.md): shipyard on one CUDA GPU in one command, <= 8 min.
#   bash tests/gpu/run.sh [--only STEP,...] [--budget SECONDS] [--cpu-dry-run] [--keep]
# Without a CUDA device it prints "no CUDA device: GPU proof skipped" and exits 0 (CI smoke test).
#
# On the GPU machine (the device tool; its image has torch but no Ray, and no network):
#   here, once:  bash tests/gpu/prepare.sh          # builds .device-carry/ (~35 MB, ignored by git)
#   carry:       [".device-carry"]
#   command:     bash tests/gpu/run.sh
#   timeout_s:   540                                # the proof's budget is 470 s; unpacking ~20 s
# This script unpacks .device-carry/ into $SHIPYARD_GPU_SITE (default /tmp/shipyard-gpu-site) when
# Ray is not importable, installs its wheels there with pip --no-index, and puts it and platform/
# on PYTHONPATH. Nothing is fetched: with no .device-carry/ and no Ray, the Ray steps fail and say so.
# Results: $OUT/gpu-proof.jsonl (JSON lines) and $OUT/gpu-proof.log (every step's output).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
export PYTHONPATH="$root/platform${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if [ -f .device-carry/ray-slim.tar.xz ] && ! "$py" -c 'import ray' 2>/dev/null; then
  site=${SHIPYARD_GPU_SITE:-/tmp/shipyard-gpu-site}
  if [ ! -f "$site/.unpacked" ]; then
    echo "unpacking .device-carry into $site"
    mkdir -p "$site"
    tar -xJf .device-carry/ray-slim.tar.xz -C "$site" &&
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .device-carry/whl/*.whl &&
      touch "$site/.unpacked" || echo "unpacking .device-carry failed: the Ray steps will fail"
  fi
  export PYTHONPATH="$site:$PYTHONPATH"
fi
exec "$py" tests/gpu/proof.py "$@"
