#!/usr/bin/env bash
# One device call for the denoising-time runtime and end-to-end numbers. Stages (default: all):
#   test   every GPU test (tests/gpu)
#   e2e    python -m benchmarks.e2e: 14B blocks at 81 and 161 frames, VSA 5%, eager and compiled (dense too)
#   prof   python -m benchmarks.block_profile: top GPU kernels of a dense, a fused-q/k and a VSA 5% 14B block
#   fid    python -m benchmarks.fidelity at 10% on the test-bed: PSNR, calibrated mask reuse, per-step error
# Writes logs and JSON under $OUT (or out/gpu_e2e).
set -uo pipefail
DEST=${OUT:-out/gpu_e2e}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
STAGES=${*:-test e2e fid}
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(0))"
date -u
for s in $STAGES; do
  case $s in
    test) python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -25 | tee "$DEST/gpu_tests.log" ;;
    e2e) python3 -m benchmarks.e2e --frames 81,161 --blocks 2 --densities 0.05 --compile --pipeline-steps 0 \
        --out "$DEST/e2e.json" 2>&1 | grep -v "kept in float32" | tee "$DEST/e2e.log" ;;
    prof) python3 -m benchmarks.block_profile --out "$DEST/block_profile.json" 2>&1 | tee "$DEST/block_profile.log" ;;
    fid) python3 -m benchmarks.fidelity --steps 50 --videos 4 --densities 0.1 --out "$DEST/fidelity.json" 2>&1 \
        | tee "$DEST/fidelity.log" ;;
  esac
  date -u
done
