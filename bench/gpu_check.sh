#!/usr/bin/env bash
# The GPU check: one prepared script for the first GPU this project gets (about 8 minutes on one H100/H200 with the
# defaults). It prints ONE table, the one the README's GPU section holds, and keeps everything under $OUT_DIR
# (default runs/gpu_check-<time>, a new folder on every run, so a rerun never meets the last one):
#   1. ResNet-50, 224 px, batch 256 per device, channels_last, the GPU recipe's augmentation: the model step alone,
#      a plain PyTorch loop and the flowerdist loop, in bf16 and fp16, from the decoded cache and from the folder
#      (workers decoding JPEGs): images/s, loop / model step, data-wait share, peak GPU memory; and the data
#      pipeline's cost per image by stage on one core, with the cores per GPU each rate needs;
#   2. ResNet-18 likewise (model step and flowerdist loop);
#   3. torch.compile on for ResNet-50 bf16 (compilation time reported apart; "off" is step 1);
#   4. configs/flowers/resnet50_gpu.yaml end to end on real photos for TRAIN_SECONDS, a SIGTERM, and a resume
#      that must continue at the step the checkpoint holds.
# Then bench/gpu_table.py prints the table and writes $OUT_DIR/gpu_check.md and gpu_check.json.
#
# On the lent GPU machine (see /work/.library/device): its python3 has torch, torchvision, accelerate and timm but not
# pydantic or wandb, and it reaches no network. Prepare here, once, in the repo root:
#   echo /.whl/ >> .git/info/exclude; echo /.gpu_data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection
#   mkdir -p .gpu_data && cp -r ../shared/data/flower_photos_train192 .gpu_data/photos   # 59 MB: or a subset
# and run (carry [".whl", ".gpu_data"], timeout_s 600):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   PYTHON=python3 PHOTOS=.gpu_data/photos OUT_DIR=$OUT/check bash bench/gpu_check.sh
#
# The CPU form the tests run (tests/test_bench.py), every step at a tiny size:
#   DEVICE=cpu MODELS="seed_resnet resnet18" PRECISIONS=bf16 DATA_PATHS=cache IMAGE_SIZE=32 BATCH=8 WINDOW=2 WINDOWS=2 PER_CLASS=20 \
#       SYNTH_SIZE=48 WORKERS=1 TRAIN_SECONDS=4 RESUME_SECONDS=3 \
#       TRAIN_ARGS="model.name=seed_resnet data.image_size=32 data.eval_image_size=0 data.batch_size=8 train.epochs=1000" \
#       bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
test -x "$PY" || command -v "$PY" >/dev/null || PY=python3
OUT_DIR=${OUT_DIR:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}
DEVICE=${DEVICE:-cuda}
read -ra MODELS <<<"${MODELS:-resnet50 resnet18}"
precisions=$(echo "${PRECISIONS:-bf16 fp16}" | tr ' ' ',')
CONFIG=${CONFIG:-configs/flowers/resnet50_gpu.yaml}
mkdir -p "$OUT_DIR"
log() { echo "gpu_check [${SECONDS} s]: $*" | tee -a "$OUT_DIR/steps.log"; }  # seconds since the start: where the time went
"$PY" -c 'import sys, torch; print(f"gpu_check: torch {torch.__version__}, CUDA available {torch.cuda.is_available()}, "
          f"GPUs {torch.cuda.device_count()}, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else sys.platform}")'

bench() {  # NAME MODEL [bench options...]
    local name=$1 model=$2; shift 2
    log "bench $name ($model)"
    "$PY" -m flowerdist bench --device "$DEVICE" --model "$model" --image-size "${IMAGE_SIZE:-224}" --batch "${BATCH:-256}" \
        --config "$CONFIG" --rounds 1 --window "${WINDOW:-10}" --windows "${WINDOWS:-3}" --workers "${WORKERS:-auto}" \
        --plain-workers "${WORKERS_PLAIN:-${WORKERS:-8}}" --pipeline-workers "${WORKERS_PIPELINE:-${WORKERS:-8}}" \
        --synthetic-per-class "${PER_CLASS:-1200}" --synthetic-size "${SYNTH_SIZE:-256}" --wandb disabled \
        --out-dir "$OUT_DIR/$name" "$@" >"$OUT_DIR/$name.log" 2>&1 || { log "bench $name failed: $(tail -n 1 "$OUT_DIR/$name.log")"; return 0; }
}

# 1-3: throughput (a failing step is logged and the others still run: the table shows what was measured)
bench "${MODELS[0]}" "${MODELS[0]}" --precision "$precisions" --data-path "${DATA_PATHS:-cache,folder}" --parts model,plain,flowerdist,pipeline
for model in "${MODELS[@]:1}"; do
    bench "$model" "$model" --precision "$precisions" --data-path cache --parts model,flowerdist
done
bench "${MODELS[0]}-compiled" "${MODELS[0]}" --precision bf16 --data-path cache --parts model --compile

# 4: the GPU recipe on real photos (generated flowers without PHOTOS), stopped by SIGTERM, then resumed
photos=${PHOTOS:-data/bench_flowers_${SYNTH_SIZE:-256}px_${PER_CLASS:-1200}}
run=$OUT_DIR/train
read -ra extra <<<"${TRAIN_ARGS:-}"
train() {  # SECONDS LOG PATTERN [overrides...]: train; once LOG shows PATTERN (training has started), SIGTERM after SECONDS
    local seconds=$1 out=$2 started=$3; shift 3
    "$PY" -m flowerdist train -c "$CONFIG" "data.root=$photos" "train.output_dir=$run" log.wandb=disabled log.progress=false \
        train.log_every=10 "${extra[@]}" "$@" >"$out" 2>&1 &
    local pid=$! waited=0
    while kill -0 "$pid" 2>/dev/null && ! grep -q "$started" "$out"; do sleep 0.2; done
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$seconds" ]; do sleep 1; waited=$((waited + 1)); done
    kill -TERM "$pid" 2>/dev/null || true
    local code=0; wait "$pid" || code=$?
    echo "$code"
}
log "train $CONFIG on $photos for ${TRAIN_SECONDS:-180} s, then SIGTERM"
code=$(train "${TRAIN_SECONDS:-180}" "$OUT_DIR/train.log" "global batch" train.overwrite=true)  # a rerun into the same OUT_DIR moves the old run aside
log "first segment exited $code (3: stopped by the signal, checkpoint saved): $(tail -n 1 "$OUT_DIR/train.log")"
stopped=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["step"])' "$run/checkpoints/last/meta.json" 2>/dev/null || echo none)
log "resume from step $stopped for ${RESUME_SECONDS:-40} s"
code=$(train "${RESUME_SECONDS:-40}" "$OUT_DIR/resume.log" "resuming from" train.resume=auto)
resumed=$(sed -n 's/.*resuming from .* (epoch [0-9]*, step \([0-9]*\)).*/\1/p' "$OUT_DIR/resume.log" | head -n 1)
log "second segment exited $code; resumed at step ${resumed:-none} (checkpoint step $stopped)"
printf '{"stopped_at": "%s", "resumed_at": "%s"}\n' "$stopped" "${resumed:-none}" >"$OUT_DIR/resume.json"

"$PY" bench/gpu_table.py "$OUT_DIR"
