#!/usr/bin/env bash
# Build .device-carry/ for tests/gpu/run.sh on the GPU machine: what its image (torch, CUDA,
# Python 3.12 x86_64, no network) lacks, so that nothing is fetched there.
#   bash tests/gpu/prepare.sh            # here, where pip reaches an index; ~1-2 minutes
# Follows ../shared/tools/device-ray/build-carry.sh: Ray's wheel is 79 MB, over the 64 MiB a device
# call may carry, so it travels unpacked and xz-packed without ray/jars and ray/rllib (~32 MB);
# the pure-Python or cp312 wheels beside it are what shipyard and Ray import that the image lacks
# (docs/gpu.md lists them), at the versions this checkout's .venv runs, where it has them.
# Output: .device-carry/ray-slim.tar.xz and .device-carry/whl/*.whl (ignored by git; ~35 MB).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
RAY_VERSION=${RAY_VERSION:-2.60.0}
PY_VERSION=${PY_VERSION:-3.12}
host=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# Imported by shipyard's `run` path or by Ray (core, Train), absent from the device image. Ray's
# dashboard extras (aiohttp_cors, opencensus, opentelemetry) are left out: Ray then runs without
# its dashboard, as it did in the device-ray check (Ray Train V2 on one GPU).
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions
          jsonschema jsonschema-specifications referencing rpds-py tensorboardX ${EXTRA_WHEELS:-})
out=.device-carry
rm -rf "$out.new"
mkdir -p "$out.new/whl"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" "$out.new"' EXIT
plat=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
pinned=()
for p in "${PACKAGES[@]}"; do
  v=$("$host" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$p" 2>/dev/null || true)
  pinned+=("$p${v:+==$v}")
done
echo "ray==$RAY_VERSION ${pinned[*]} for cp${PY_VERSION/./} x86_64"
"$host" -m pip download -q --no-deps "${plat[@]}" -d "$tmp" "ray==$RAY_VERSION"
(cd "$tmp" && mkdir x && cd x && unzip -q ../ray-*.whl &&
   tar --exclude=ray/jars --exclude=ray/rllib -cf - . | xz -T2 -6 > "$root/$out.new/ray-slim.tar.xz")
"$host" -m pip download -q --no-deps "${plat[@]}" -d "$out.new/whl" "${pinned[@]}"
rm -rf "$out"
mv "$out.new" "$out"
du -sh "$out"
ls "$out/whl"
