#!/usr/bin/env bash
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export OMP_NUM_THREADS=2
/usr/bin/time -v knlight predict --config configs/trainer/localize.yaml --config configs/localize/gemma3-270m.yaml \
  --config configs/gemma/localize.yaml --config configs/gemma/localize-amig.yaml > experiments/gemma/logs/localize-amig.log 2>&1
