#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a lent H100 / H200 (15 minutes of device time in all):
# install without network, the tests on CUDA, the kernels' microbenchmarks, and the step at Vicuna-7B dims
# (eager vs compiled). Results land in $OUT (JSON + PNG + logs); commit them under bench/results/.
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
step() {  # step NAME COMMAND...: run one part, log it, keep going when it fails
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    if ! "$@" > "$OUT/$name.log" 2>&1; then
        echo "!!! $name failed (see $name.log)"
        status=1
    fi
    echo "=== $name: $((SECONDS - start)) s"
    tail -n 5 "$OUT/$name.log"
}

python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || status=1
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/versions.txt"

if [ "$SMOKE" = 1 ]; then
    step tests python3 -m pytest -q -x tests/test_fused_adapter.py tests/test_lean_step.py -k "not compiled"
    step kernels python3 bench/bench_kernels.py --quick --out "$OUT/kernels.json"
    step e2e python3 bench/bench_e2e.py --smoke --quick --compile --out "$OUT/e2e.json"
else
    # The op tests and the loop on CUDA tensors (conftest picks the device); the slow statistical tests stay on CI.
    step tests timeout 240 python3 -m pytest -q -x tests/ -k "not sample_mode_matches and not chi"
    step kernels timeout 240 python3 bench/bench_kernels.py --quick --compile --out "$OUT/kernels_cuda.json"
    step e2e timeout 300 python3 bench/bench_e2e.py --device cuda --compile --out "$OUT/e2e_cuda.json"
fi
ls -la "$OUT"
exit $status
