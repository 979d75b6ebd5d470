#!/usr/bin/env bash
# Creates .venv (if missing) and installs shipyard with its dev extras into it.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c deploy/constraints-dev.txt -e ".[dev]"
echo "shipyard installed in $(pwd)/.venv"
