#!/usr/bin/env bash
# The fused kernels on the GPU machine, in one call: build and install cutlass_evt_fusion (timed), run the
# MLP kernel tests (tests/test_mlp_kernels.py: Triton forward, CUTLASS EVT backward, FP8, the whole fused
# MLP against the plain PyTorch path in bf16, torch.compile without graph breaks), the q/k norm + RoPE
# kernel tests (tests/test_qk_kernel.py), the loss kernel's and the attention paths' GPU tests (varlen
# included), then time forward + backward at the full config's shape for each path (tools/bench_mlp.py,
# tools/bench_qk.py, tools/bench_attention.py). Plain text. On one H100 (2026-12-05) the build took 77 s and
# the tests 327 s, and the whole did not fit a 560 s call: pick a part with the variables below.
#
#   source .carry/setup.sh; bash tools/gpu_mlp_check.sh      # from the repo root; setup.sh exports CUTLASS_PATH
#   GPU_CHECK_TESTS="tests/test_attention.py" GPU_CHECK_BENCH="attention" bash tools/gpu_mlp_check.sh
#
# GPU_CHECK_TESTS: the test files to run (default the four kernel files; empty: none).
# GPU_CHECK_BENCH: which of mlp, qk, attention to time (default all three; empty: none).
# GPU_CHECK_BUILD=0: skip building cutlass_evt_fusion (its tests then skip, and MLP_KERNEL=auto says why).
#
# Exit status: 0 when the build and the tests passed (the benchmark is informative only).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
t_start=$(date +%s)

echo "== environment"
$PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
'| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
$PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
nvcc --version | tail -n 2 | head -n 1
echo "CUTLASS_PATH=${CUTLASS_PATH:-unset, so the headers of the nvidia-cutlass wheel if installed}"

echo
if [ "${GPU_CHECK_BUILD:-1}" = 1 ]; then
    echo "== build: pip install --no-build-isolation ./cutlass_evt_fusion"
    build_log=$(mktemp /tmp/cutlass_evt_build.XXXXXX.log)
    b0=$(date +%s.%N)
    MAX_JOBS=${MAX_JOBS:-4} $PY -m pip install --no-build-isolation --no-deps --no-index -v ./cutlass_evt_fusion >"$build_log" 2>&1
    build_rc=$?
    b1=$(date +%s.%N)
    echo "build: rc=$build_rc seconds=$(awk "BEGIN{printf \"%.1f\", $b1-$b0}") log=$build_log"
    grep -E "^ *cutlass_evt_fusion: |ptxas (info|warning)|warning C[0-9]+|error" "$build_log" | sed 's/^ */  /' | head -n 20
    if [ $build_rc -ne 0 ]; then
        echo "build failed; last lines of the log:"
        tail -n 60 "$build_log"
        status=1
    fi
else
    echo "== build: skipped (GPU_CHECK_BUILD=0)"
fi

echo
echo "== import (from /tmp, the installed copy; then from the repo root, the source tree's copy)"
(cd /tmp && $PY -c "import cutlass_evt_fusion as c; print('installed:', c.__file__, '| available:', c.available(), c.unavailable_reason())")
$PY -c "import cutlass_evt_fusion as c, train_gpt as tg; print('repo root:', c.__file__, '| available:', c.available(), c.unavailable_reason(),
'| MLP_KERNEL=auto ->', tg.pick_mlp_kernel('auto'))"

echo
kernel_tests=${GPU_CHECK_TESTS-tests/test_mlp_kernels.py tests/test_qk_kernel.py tests/test_loss_kernel.py tests/test_attention.py}
if [ -n "$kernel_tests" ]; then
    echo "== tests: pytest $kernel_tests"
    $PY -m pytest -q -rs -s -p no:cacheprovider $kernel_tests 2>&1 | grep -Ev "^\s*$" | tail -n 60
    test_rc=${PIPESTATUS[0]}
    echo "tests: rc=$test_rc"
    [ "$test_rc" -eq 0 ] || status=1
else
    echo "== tests: none (GPU_CHECK_TESTS is empty)"
fi

benches=" ${GPU_CHECK_BENCH-mlp qk attention} "
for bench in mlp qk attention; do
    case "$benches" in *" $bench "*) ;; *) continue ;; esac
    seconds=$(case $bench in mlp) echo 200 ;; qk) echo 120 ;; attention) echo 150 ;; esac)
    args=$([ "$bench" = mlp ] && echo "${BENCH_ARGS:-}")
    echo
    echo "== benchmark: tools/bench_$bench.py"
    timeout "$seconds" $PY "tools/bench_$bench.py" $args 2>&1 | grep -Ev "^\s*$"
done
echo
echo "gpu_mlp_check: status=$status total_seconds=$(( $(date +%s) - t_start ))"
exit $status
