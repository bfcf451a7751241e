#!/usr/bin/env bash
# Experiments 1-2 localization: zero baseline (Dai KN) then AMIG, on experiments/gemma/data/gemma_multi.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export OMP_NUM_THREADS=2
mkdir -p experiments/gemma/logs
base=(--config configs/trainer/localize.yaml --config configs/localize/gemma3-270m.yaml --config configs/gemma/localize.yaml)
/usr/bin/time -v knlight predict "${base[@]}" > experiments/gemma/logs/localize-zero.log 2>&1
/usr/bin/time -v knlight predict "${base[@]}" --config configs/gemma/localize-amig.yaml > experiments/gemma/logs/localize-amig.log 2>&1
