#!/usr/bin/env bash
# README's second command (and what CI runs): install, then the whole test suite.
#   - Horovod is built once from its sdist and the wheel cached (deploy/horovod.sh, ~5-7 min the
#     first time on 2 cores, seconds after that);
#   - the real helm binary is fetched once (deploy/helm.sh);
#   - PostgreSQL is installed from Debian when missing (the tests start their own server);
#   - so are Chromium and its driver (the dashboard test drives a headless browser);
#   - a real Kubernetes API server for custom resources is built once from Debian's Go source
#     (deploy/k8s-api.sh; ~10 min CPU the first time, under a second after that) for the kuberay tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
bash deploy/horovod.sh .venv
bash deploy/helm.sh >/dev/null
bash deploy/postgres.sh install
bash deploy/chromium.sh .venv   # Debian's chromium + chromedriver for the dashboard's browser test
bash deploy/k8s-api.sh build >/dev/null
exec .venv/bin/python -m pytest -ra "$@"
