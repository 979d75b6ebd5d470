#!/usr/bin/env bash
# Headless Chromium for the dashboard's browser test (tests/integration/test_dashboard.py):
# Debian's `chromium` and `chromium-driver` (apt-get, as root or through `sudo -n`) and the
# `selenium` package in the venv (default .venv). Idempotent: a second run only checks, in well
# under a second. Progress on stderr.
#
#   deploy/chromium.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
log() { echo "chromium.sh: $*" >&2; }
die() { log "$*"; exit 1; }

if ! { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } || ! command -v chromedriver >/dev/null; then
  run=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null \
      || die "chromium is missing and this user can neither apt-get (not root) nor sudo without a password; install it: apt-get install chromium chromium-driver"
    run=(sudo -n)
  fi
  command -v apt-get >/dev/null || die "chromium is missing and there is no apt-get here; install Chromium and its chromedriver, or set CHROMIUM and CHROMEDRIVER"
  log "installing Debian's chromium and chromium-driver (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  "${run[@]}" apt-get update -qq >&2 || log "apt-get update failed; trying the cached package lists"
  "${run[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi

if ! "$venv/bin/python" -c "import selenium" 2>/dev/null; then
  log "installing selenium into $venv"
  "$venv/bin/python" -m pip install -q -c deploy/constraints-dev.txt "selenium>=4.20" >&2
fi
log "ready: $(chromium --version 2>/dev/null || chromium-browser --version), $(chromedriver --version | cut -d' ' -f1-2), selenium $("$venv/bin/python" -c 'import selenium; print(selenium.__version__)')"
