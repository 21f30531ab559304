#!/usr/bin/env bash
# Train the sparsify test-bed (small Wan DiT on procedural videos) on one GPU, then measure its heads.
#
#   bash benchmarks/testbed_train.sh smoke        # ~150 eager + ~150 compiled steps: throughput, end-to-end check
#   STEPS=4000 TRAIN_ARGS="--compile --max-seconds 470" bash benchmarks/testbed_train.sh full   # the shipped run
#
# Writes under $OUT (device machine) or ./out/testbed_gpu: train_log.csv, train_summary.json,
# testbed_wan.safetensors, testbed_wan.json, heads.json, heads.txt, preview.png.
# Expects diffusers importable (on the device machine: pip install the carried .whl/ first, see RESULTS.md).
set -euo pipefail
MODE=${1:-full}
DEST=${OUT:-out/testbed_gpu}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'gpu', torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
date -u
if [ "$MODE" = smoke ]; then
  S=${STEPS:-150}
  python3 -m tools.train_testbed --steps "$S" --out /tmp/tb_eager --log-every 25 --eval-every 0 --warmup 50
  python3 -m tools.train_testbed --steps "$S" --out /tmp/tb_comp --compile --log-every 25 --eval-every 0 --warmup 50
  cp /tmp/tb_eager/train_log.csv "$DEST/eager_log.csv"; cp /tmp/tb_comp/train_log.csv "$DEST/compiled_log.csv"
  cp /tmp/tb_comp/train_summary.json "$DEST/compiled_summary.json"
  python3 -m tools.testbed_heads --weights /tmp/tb_comp/testbed_wan.safetensors --samples 1 --ts 0.5 --out "$DEST/heads_smoke.json" | tail -n 4
  python3 -m tools.testbed_preview --weights /tmp/tb_comp/testbed_wan.safetensors --out "$DEST/preview_smoke.png" --steps 10
else
  S=${STEPS:-4000}
  T0=$(date +%s)
  python3 -m tools.train_testbed --steps "$S" --out "$DEST" --seed 0 ${TRAIN_ARGS:-} 2>&1 | tee "$DEST/train.txt"
  echo "train wall (incl. start-up, final eval, save): $(( $(date +%s) - T0 )) s"
  python3 -m tools.testbed_heads --weights "$DEST/testbed_wan.safetensors" --out "$DEST/heads.json" | tee "$DEST/heads.txt"
  python3 -m tools.testbed_preview --weights "$DEST/testbed_wan.safetensors" --out "$DEST/preview.png"
fi
ls -la "$DEST"
