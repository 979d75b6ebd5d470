#!/usr/bin/env bash
# README's first command: install, shard scikit-learn's digits, train them on 2 Ray workers.
# Running it again resumes from the latest checkpoint (and, if training already finished,
# only re-evaluates).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh
data=~/.shipyard/datasets/digits
set -x
.venv/bin/shipyard data shard sklearn:digits:train "$data/train" --rows-per-shard 500 --overwrite
.venv/bin/shipyard data shard sklearn:digits:test "$data/test" --overwrite
.venv/bin/shipyard run jobs/digits/job.yaml
