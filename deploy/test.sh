#!/usr/bin/env bash
# README's second command (and what CI runs): install, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
exec .venv/bin/python -m pytest -ra "$@"
