#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a lent H100 / H200 (15 minutes of device time in all):
# install without network, the decode step at Vicuna-7B dims eager vs captured whole as a CUDA graph, one-token
# decoding against HF (static cache + compile), adapter + cosine in a graph, then the tests on CUDA. The kernels'
# microbenchmarks: bench/bench_kernels.py (figures of an earlier run in bench/results/kernels_h200*.json). Results land in $OUT (JSON + PNG, one log: the device tool returns at most 8 files);
# commit them under bench/results/.
#
#   bash bench/gpu_run.sh            # on the GPU machine ($OUT set by the device tool)
#   SMOKE=1 OUT=/tmp/out bash bench/gpu_run.sh   # the CPU dry run: toy widths, every step once
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sdalign_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SMOKE=${SMOKE:-0}
status=0
LOG="$OUT/run.log"
step() {  # step NAME COMMAND...: run one part, append its output to the log, keep going when it fails
    local name=$1
    shift
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    if ! "$@" >> "$LOG" 2>&1; then
        echo "!!! $name failed (see run.log)" | tee -a "$LOG"
        status=1
    fi
    echo "=== $name: $((SECONDS - start)) s" | tee -a "$LOG"
    tail -n 12 "$LOG"
}

# No network there, and the C++ ops are CPU-only: install the checkout alone, without building them.
SDALIGN_RT_NO_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || status=1
{ python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null; } | tee "$OUT/versions.txt"

# The kernels and the loop on CUDA tensors (conftest picks the device); CPU-only and statistical tests stay on CI.
# tree_attention's and the step object's tests run first, on their own (below).
GPU_TESTS="tests/test_fused_adapter.py tests/test_cosine_accept.py tests/test_verify_tree_greedy.py
 tests/test_verify_tree_sampling.py tests/test_kv_compact.py tests/test_kv_cache.py tests/test_lean_step.py tests/test_decoder.py"
if [ "$SMOKE" = 1 ]; then
    step graph_step python3 bench/bench_graph_step.py --smoke --out "$OUT/graph_step.json"
    step tests python3 -m pytest -q -p no:cacheprovider tests/test_decode_step.py -k "capture_safe or cuda_graph"
else
    # Budget (one call, under 10 minutes): the graphed step first (issue 22's figures: ~4 min with HF's compile),
    # then the CUDA graph and capture-safety tests and the rest of the GPU subset (~3 min).
    # The kernel the graphed step's attention runs, first: a compile error there would fail every decode row.
    step attention_tests timeout 60 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_tree_attention.py
    step graph_step timeout 300 python3 bench/bench_graph_step.py --device cuda --steps 20 --out "$OUT/graph_step_cuda.json"
    step attention_kernel timeout 60 python3 bench/bench_kernels.py --ops tree_attention --batches 1 --no-compile --out "$OUT/kernels_cuda.json"
    step graph_tests timeout 90 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_decode_step.py
    # shellcheck disable=SC2086
    step tests timeout 100 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider $GPU_TESTS -k "not sample_mode_matches and not chi"
fi
ls -la "$OUT"
exit $status
