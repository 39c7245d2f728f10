#!/usr/bin/env bash
# Everything a session with a GPU should run, in one command: the CUDA tests (Triton kernels against the
# torch ops, CUDA graph replays against eager steps, greedy tokens against transformers + peft, overlapped
# steps against plain ones), then the GPU benchmark (bench/gpu.sh). If the CUDA tests fail, the
# benchmark still runs on the engine's own ops (a failing test may be the test's fault, and device time
# is scarce), saying so; if the benchmark then fails too, it runs again on the torch ops
# (CHATMED_DISABLE_TRITON=1), so the run brings back figures.
#
#   bash bench/gpu_check.sh [flags for bench/gpu.sh]      (logs go to $LOG_DIR, default bench/results)
#
# Needs torch with CUDA, triton, transformers, peft and pytest.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-bench/results}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1

"$PYTHON" -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton",
triton.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")'

"$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" \
    tests/engine/test_triton_ops.py tests/engine/test_decode_graphs.py \
    tests/engine/test_overlap.py::test_cuda_graphs_with_overlapped_steps_give_the_same_tokens \
    2>&1 | tee "$LOG_DIR/gpu_tests.log"
tests=${PIPESTATUS[0]}
if [ "$tests" -ne 0 ]; then
    echo "gpu_check: CUDA tests failed (exit $tests): benchmarking anyway; read the figures with the failures"
fi
PYTHON="$PYTHON" bash bench/gpu.sh --json "$LOG_DIR/gpu.json" "$@" 2>&1 | tee "$LOG_DIR/gpu_bench.log"
bench=${PIPESTATUS[0]}
if [ "$tests" -ne 0 ] && [ "$bench" -ne 0 ]; then
    echo "gpu_check: the benchmark failed too (exit $bench): again on the torch ops"
    CHATMED_DISABLE_TRITON=1 PYTHON="$PYTHON" bash bench/gpu.sh --json "$LOG_DIR/gpu_torch.json" "$@" 2>&1 \
        | tee "$LOG_DIR/gpu_bench_torch.log"
fi
echo "gpu_check: tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
