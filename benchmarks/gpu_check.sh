#!/usr/bin/env bash
# GPU check for issue 16, ready to run on a machine with (at least two) CUDA GPUs; no model hub is needed.
#
#   1. the attribution speed benchmark (exact IG, fast engine, chunk_rows=auto) on a random-weight
#      Llama-2-7B-shaped model built from a config, in bf16, short and long prompts, with the same run's dense
#      bf16 matmul throughput at the LM head's and the FFN's shapes;
#   2. a 2-GPU DDP `knlight predict` of that model (saved to a local folder first, ~13.5 GB) on the RML-LAMA
#      fixture, bf16, chunk_rows=auto.
#
# Everything lands as JSON under $OUT (default: gpu_check/):
#   env.json, attribution_gpu.json, attribution_gpu_long.json, ddp_predict.json (+ the run folder).
#
#   bash benchmarks/gpu_check.sh                                   # on the GPU machine, from the repo root
#   SHAPE=llamasmall DEVICE=cpu GPUS=2 bash benchmarks/gpu_check.sh  # dry run of the same steps on CPU
#
# Variables: PYTHON (default python), OUT, SHAPE (llama7b | llamasmall), DEVICE (cuda | cpu), GPUS (2), STEPS (20),
# EXTRA (more predict overrides, e.g. "--data.init_args.max_facts 1").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-gpu_check}
SHAPE=${SHAPE:-llama7b}
DEVICE=${DEVICE:-cuda}
GPUS=${GPUS:-2}
STEPS=${STEPS:-20}
mkdir -p "$OUT"

echo "== environment"
"$PYTHON" - "$OUT/env.json" <<'PY'
import json, sys, torch, transformers
info = dict(
    torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda,
    gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    bf16_supported=bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
)
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
print(json.dumps(info))
PY

echo "== 1. attribution speed: $SHAPE, bf16, $DEVICE"
"$PYTHON" benchmarks/attribution.py --models "$SHAPE" --engines fast --device "$DEVICE" --dtype bfloat16 \
    --chunk-rows auto --prompts 3 --out "$OUT/attribution_gpu.json"
"$PYTHON" benchmarks/attribution.py --long --models "$SHAPE" --engines fast --device "$DEVICE" --dtype bfloat16 \
    --chunk-rows auto --prompts 2 --out "$OUT/attribution_gpu_long.json"

echo "== 2. DDP predict on $GPUS devices"
MODEL_DIR="$OUT/$SHAPE-random"
"$PYTHON" - "$SHAPE" "$MODEL_DIR" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
from attribution import build  # the benchmark's random-weight model, built in place in bf16
shape, folder = sys.argv[1], Path(sys.argv[2])
if not (folder / "config.json").exists():
    lm = build(shape, "cpu", "bfloat16")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
print(f"model folder: {folder}")
PY
ACCELERATOR=gpu
[ "$DEVICE" = cpu ] && ACCELERATOR=cpu
RUNS="$OUT/runs"
rm -rf "$RUNS"
START=$(date +%s.%N)
"$PYTHON" -m knlight predict --config configs/tiny/localize.yaml \
    --model.init_args.lm.model "$MODEL_DIR" --model.init_args.lm.dtype bf16 \
    --model.init_args.ig.steps "$STEPS" --model.init_args.ig.chunk_rows auto \
    --data.init_args.path tests/fixtures/rml_small.jsonl --data.init_args.batch_size 4 \
    --trainer.accelerator "$ACCELERATOR" --trainer.devices "$GPUS" --trainer.strategy ddp \
    --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$RUNS" ${EXTRA:-}
END=$(date +%s.%N)
"$PYTHON" - "$RUNS" "$START" "$END" "$GPUS" "$OUT/ddp_predict.json" <<'PY'
import json, sys
from pathlib import Path
runs, start, end, gpus, out = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
files = sorted(runs.rglob("attributions.jsonl"))
if not files:
    sys.exit(f"no attributions.jsonl under {runs}: the DDP predict wrote nothing")
records = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
summary = dict(devices=gpus, wall_s=end - start, records=len(records), files=[str(f) for f in files],
               records_per_s=len(records) / (end - start))
open(out, "w").write(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary))
PY
echo "== done: JSON in $OUT/"
