#!/usr/bin/env bash
# GPU check, under 5 minutes on one GPU: ResNet-50 at 224 px, channels_last, bf16 and fp16;
# model step alone vs the plain loop and the flowerdist loop end to end (images/s and the share
# of time spent waiting for data), from image folders and from the decoded cache (data.cache);
# plus the 2-process DDP step when two GPUs exist. Prints the table, writes bench/gpu_check.json.
#
#   bash bench/gpu_check.sh                        # on a GPU machine, after `make setup`
#   DEVICE=cpu MODEL=seed_resnet IMAGE_SIZE=32 BATCH=8 WINDOW=2 WINDOWS=2 PER_CLASS=10 SYNTH_SIZE=48 \
#       bash bench/gpu_check.sh                    # the tiny CPU form the tests run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
test -x "$PY" || PY=python3
OUT=${OUT:-runs/gpu_check}
PARTS=model,plain,flowerdist,pipeline
# one torch import (~2 s) for the line and the GPU count
gpus=$("$PY" -c 'import sys, torch; n = torch.cuda.device_count(); print(n)
print(f"gpu_check: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPUs: {n}", file=sys.stderr)')
if [ "$gpus" -ge 2 ] || [ "${DEVICE:-cuda}" = cpu ]; then
  PARTS=$PARTS,ddp
fi
"$PY" -m flowerdist bench \
  --device "${DEVICE:-cuda}" --model "${MODEL:-resnet50}" --image-size "${IMAGE_SIZE:-224}" --batch "${BATCH:-128}" \
  --precision bf16,fp16 --data-path "${DATA_PATHS:-folder,cache}" --parts "$PARTS" --rounds 1 \
  --window "${WINDOW:-10}" --windows "${WINDOWS:-3}" --workers "${WORKERS:-8}" --pipeline-workers "${WORKERS:-8}" \
  --synthetic-per-class "${PER_CLASS:-400}" --synthetic-size "${SYNTH_SIZE:-256}" --wandb "${WANDB:-offline}" --out-dir "$OUT"
cp "$OUT/bench.json" "${JSON:-$OUT/gpu_check.json}"
