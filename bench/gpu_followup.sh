#!/usr/bin/env bash
# The second, shorter GPU call of the H200 session (after bench/gpu_run.sh, with the fixes its figures asked for):
# the 7B decode step eager and compiled with the cache views marked static (CUDA graphs), the adapter's split and
# one-launch paths each replayed in a CUDA graph, and the loop's tests on the GPU with their failure reports.
#
#   bash bench/gpu_followup.sh        # on the GPU machine ($OUT set by the device tool); ~4 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sdalign_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG=$OUT/run2.log
SDALIGN_RT_NO_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1
echo "== e2e step" | tee -a "$LOG"
timeout 95 python3 bench/bench_e2e.py --device cuda --compile --parts decode_step decode_step_compiled \
    --out "$OUT/e2e_cuda_step.json" >> "$LOG" 2>&1; echo "rc $?" | tee -a "$LOG"
grep -c "skipping cudagraphs" "$LOG" | sed 's/^/cudagraph skips: /' | tee -a "$LOG"
echo "== kernels fused" | tee -a "$LOG"
timeout 45 python3 bench/bench_kernels.py --ops fused_adapter adapter_cosine_accept \
    --providers triton triton+graph triton_fused triton_fused+graph --no-compile \
    --out "$OUT/kernels_cuda_split.json" >> "$LOG" 2>&1; echo "rc $?" | tee -a "$LOG"
echo "== tests" | tee -a "$LOG"
timeout 105 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider --timeout 90 tests/test_lean_step.py \
    tests/test_decoder.py -k "not sample_mode_matches and not chi" >> "$LOG" 2>&1; echo "rc $?" | tee -a "$LOG"
tail -n 60 "$LOG"
