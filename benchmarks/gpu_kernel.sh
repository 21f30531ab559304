#!/usr/bin/env bash
# Block-sparse kernel on the GPU machine, in one call: environment, GPU tests, variant sweep, benchmark.
#
#   bash benchmarks/gpu_kernel.sh [stage ...]   stages: env tests sweep pick bench bench64 bwdtests bwd (default: env tests sweep)
#   (pick: the fastest accurate sweep variant becomes the benchmark's 'ours' row, via --ours-opts)
#   (bwdtests: backward and forward GPU tests; bwd: backward benchmark with the launch-variant sweep,
#    BWD_SHAPES / BWD_DENSITIES / BWD_ARGS override its shapes, densities and extra arguments)
#
# Logs and JSON go to $OUT (the device tool's return folder; /tmp/gpu_kernel_out otherwise). Every stage
# gets a time limit and the whole script stays under BUDGET_S seconds (default 560), so the logs of the
# finished stages always come back. The last thing printed is the benchmark table.
set -u
OUT=${OUT:-/tmp/gpu_kernel_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-560}
END=$((SECONDS + BUDGET_S))
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests sweep)
ROOT=$(pwd)

# If work in progress elsewhere in the package breaks `import sparsify`, run from a minimal copy
# holding only the kernel, the reference, the benchmark and the GPU test.
if ! $PY -c "import sparsify.kernels.block_sparse" 2>"$OUT/import_error.txt"; then
    echo "import sparsify failed (see import_error.txt): using a minimal copy" | tee -a "$OUT/env.txt"
    SHIM=/tmp/bs_shim
    rm -rf $SHIM && mkdir -p $SHIM/sparsify/kernels $SHIM/tests/gpu $SHIM/benchmarks
    echo '"""shim"""' > $SHIM/sparsify/__init__.py
    echo '"""shim"""' > $SHIM/sparsify/kernels/__init__.py
    cp sparsify/kernels/block_sparse.py sparsify/kernels/reference.py $SHIM/sparsify/kernels/
    cp benchmarks/__init__.py benchmarks/attention.py $SHIM/benchmarks/
    cp sparsify/kernels/block_sparse_bwd.py $SHIM/sparsify/kernels/
    cp tests/gpu/test_block_sparse_gpu.py tests/gpu/test_backward_gpu.py $SHIM/tests/gpu/
    cp pyproject.toml $SHIM/ 2>/dev/null
    cd $SHIM || exit 1
else
    rm -f "$OUT/import_error.txt"
fi

left() { echo $((END - SECONDS)); }
limit() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; echo "$want"; }

for st in "${STAGES[@]}"; do
    if [ "$(left)" -lt 30 ]; then echo "== skip $st: budget spent"; continue; fi
    echo "== stage $st ($(left) s left)"
    case $st in
    env)
        {
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
            $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
            $PY -c "import pytest; print('pytest', pytest.__version__)" || echo "no pytest"
            $PY -c "from triton.tools.tensor_descriptor import TensorDescriptor; print('TensorDescriptor ok')"
        } >"$OUT/env.txt" 2>&1
        cat "$OUT/env.txt"
        ;;
    tests)
        timeout "$(limit 200)" $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_block_sparse_gpu.py -W ignore::UserWarning \
            >"$OUT/tests.log" 2>&1
        echo "tests rc=$?"; tail -n 15 "$OUT/tests.log"
        ;;
    sweep)
        timeout "$(limit 330)" $PY -m benchmarks.attention --shapes "${SWEEP_SHAPES:-wan14b}" \
            --densities "${SWEEP_DENSITIES:-5,10}" --sweep --no-flash --warmup-ms 50 --rep-ms 400 \
            --out "$OUT/attention_sweep.json" >"$OUT/sweep.log" 2>&1
        echo "sweep rc=$?"; grep -v "^\[" "$OUT/sweep.log" | tail -n 40
        ;;
    pick)  # the fastest accurate variant of the sweep becomes the 'ours' row of the benchmark
        $PY -c "import json, sys; from benchmarks.attention import pick_best; n, o = pick_best(json.load(open('$OUT/attention_sweep.json'))); print('picked', n, o); open('$OUT/choice.json', 'w').write(json.dumps(o))" 2>&1 | tail -n 3
        ;;
    bench)
        CHOICE=()
        [ -s "$OUT/choice.json" ] && CHOICE=(--ours-opts "@$OUT/choice.json")
        timeout "$(limit 330)" $PY -m benchmarks.attention --shapes "${BENCH_SHAPES:-wan1.3b,wan14b}" \
            --densities "${BENCH_DENSITIES:-2,5,10,20,50}" "${CHOICE[@]}" ${BENCH_ARGS:-} --out "$OUT/attention_bench.json" \
            >"$OUT/bench.log" 2>&1
        echo "bench rc=$?"; grep -v "^\[" "$OUT/bench.log" | tail -n 40
        ;;
    bench64)
        timeout "$(limit 200)" $PY -m benchmarks.attention --block 64 --shapes "${BENCH_SHAPES:-wan1.3b}" \
            --densities "${BENCH_DENSITIES:-5,10}" --no-flash ${BENCH_ARGS:-} --out "$OUT/attention_bench64.json" \
            >"$OUT/bench64.log" 2>&1
        echo "bench64 rc=$?"; grep -v "^\[" "$OUT/bench64.log" | tail -n 20
        ;;
    bwdtests)
        timeout "$(limit 220)" $PY -m pytest -q -p no:cacheprovider tests/gpu/test_backward_gpu.py tests/gpu/test_block_sparse_gpu.py \
            -W ignore::UserWarning >"$OUT/bwdtests.log" 2>&1
        echo "bwdtests rc=$?"; tail -n 25 "$OUT/bwdtests.log"
        ;;
    bwd)
        timeout "$(limit 300)" $PY -m benchmarks.attention --backward --bwd-sweep --shapes "${BWD_SHAPES:-wan1.3b}" \
            --densities "${BWD_DENSITIES:-2,5,10,20,50}" --warmup-ms 50 --rep-ms 400 ${BWD_ARGS:-} \
            --out "$OUT/attention_bwd.json" >"$OUT/bwd.log" 2>&1
        echo "bwd rc=$?"; grep -v "^\[" "$OUT/bwd.log" | tail -n 100
        ;;
    *) echo "unknown stage $st" ;;
    esac
done
cd "$ROOT" || true
echo "== done, $(left) s of budget left"
