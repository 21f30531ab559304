#!/usr/bin/env bash
# GPU runs for the foundation and calibrator. Stages (default: all):
#   test    GPU tests of the whole op and of sparsify() on CUDA
#   op      python -m benchmarks.whole_op (layout + selection + kernel + inverse vs cuDNN)
#   cal13   calibrator on the Wan-1.3B shape at 480p (2 inputs x 4 steps)
#   attn    python -m benchmarks.attention --quick with the whole-op row (same run as cuDNN, flash, Flex)
#   fast    GPU tests of the fast paths (fused gather, pooling, top-k, Veda peaks) and of the op
#   opm     whole op at Wan-14B 5% for VSA, Veda and XAttention: CUDA profile, stages, ablation of each fast path
#   cal14   calibrator on the Wan-14B shape at 720p (1 input x 1 step, reduced candidates, no output-error pass)
# Writes logs and recipes under $OUT (or out/gpu_foundation).
set -uo pipefail
DEST=${OUT:-out/gpu_foundation}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
STAGES=${*:-test op attn cal13 cal14}
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name(0))"
date -u
for s in $STAGES; do
  case $s in
    test) python3 -m pytest -q -p no:cacheprovider tests/gpu/test_op_gpu.py 2>&1 | tail -30 | tee "$DEST/gpu_tests.log" ;;
    fast) python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gather_gpu.py tests/gpu/test_op_gpu.py 2>&1 | tail -30 \
        | tee "$DEST/gpu_fast_tests.log" ;;
    opm) python3 -m benchmarks.whole_op --shapes 14b --densities 0.05 --methods vsa,veda,xattention --ablate --profile \
        --peak-configs ${PEAK_CONFIGS:-64x256x4,128x128x8} --out "$DEST/whole_op_methods.json" 2>&1 | tee "$DEST/whole_op_methods.log" ;;
    op) python3 -m benchmarks.whole_op --out "$DEST/whole_op.json" 2>&1 | tee "$DEST/whole_op.log" ;;
    attn) python3 -m benchmarks.attention --quick --no-flash --plugin benchmarks.whole_op \
        --out "$DEST/attention_op.json" 2>&1 | tee "$DEST/attention_op.log" ;;
    cal13) ( time python3 -m sparsify.calibrate --model benchmarks.wan_shapes:wan_1_3b --grid 21x30x52 --inputs 2 \
        --steps 4 --budget 0.1 --out "$DEST/wan1.3b.yaml" --checkpoint-dir none --no-plots --quiet ) 2>&1 \
        | tee "$DEST/calib_1.3b.log" ;;
    cal14) ( time python3 -m sparsify.calibrate --model benchmarks.wan_shapes:wan_14b --grid 21x45x80 --inputs 1 \
        --steps 1 --tiles 4x4x4,1x8x8,16x2x2 --query-fraction 0.05 --budget 0.1 --out "$DEST/wan14b.yaml" \
        --checkpoint-dir none --no-plots --quiet --no-output-error ) 2>&1 | tee "$DEST/calib_14b.log" ;;
  esac
  date -u
done
