#!/usr/bin/env bash
# One prepared GPU session: continue training the embedded model for TRAIN_MINUTES, then the GPU
# benchmarks (DF-RISE, DF-CAM, tap overhead), each under its own time limit, everything logged to
# $OUT (or ./out). Run from the repository root on a CUDA machine that has torch and transformers;
# diffusers may come as wheels in .whl/ (installed into /tmp/site).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
TRAIN_MINUTES=${TRAIN_MINUTES:-4}
if [ "$TRAIN_MINUTES" != "0" ]; then
  python3 scripts/train_embedded.py --init-from explain/models/shapes-64 --out /tmp/shapes-64 \
    --archive "$OUT/model" --log "$OUT/train.log" --pool 150000 --unet-steps 50000 --batch 256 \
    --lr 3e-4 --text-lr 2e-4 --warmup 100 --ground-weight "${GROUND_WEIGHT:-0.02}" \
    --object-mix "${OBJECT_MIX:-0.1,0.5,0.4}" --high-noise-share "${HIGH_NOISE_SHARE:-0.4}" \
    --max-minutes "$TRAIN_MINUTES" 2>&1 \
    | grep -v -i "warn\|shards\|Loading\|float32"
  # the held-out figures of what was just trained, on this machine's 16 CPU cores (needs scipy)
  timeout "${QUALITY_SECONDS:-90}" python3 benchmarks/bench_embedded_quality.py --model /tmp/shapes-64 --n 240 \
    --threads 16 --json "$OUT/quality.json" 2>&1 | grep -v -i "warn\|Loading" | tee "$OUT/quality.txt"
fi
[ "${BENCH:-1}" = "0" ] && exit 0
for bench in "bench_rise.py --device cuda" "bench_cam.py --device cuda" "bench_tap_overhead.py --device cuda"; do
  script=${bench%% *}
  [ -f "benchmarks/$script" ] || { echo "skip $script (missing)"; continue; }
  echo "=== $bench"
  timeout 75 python3 benchmarks/$bench 2>&1 | grep -v -i "warn\|Loading\|float32" | tee -a "$OUT/benchmarks.txt"
done
