#!/usr/bin/env bash
# One pass on a CUDA machine: record the environment, build qgrad._C with its CUDA kernels, run the test suite
# on the GPU, then the benchmarks; logs and pytest-benchmark JSON go to the folder given as $1.
#
#   bash benchmarks/run_gpu.sh results_dir [stage ...]   # stages: build tests bench profile (default: the
#                                                          first three)
#
# Every stage has a time limit (seconds, e.g. QGRAD_TESTS_LIMIT=300) so that a slow one cannot starve the
# next; a stage's failure is reported at the end without stopping the others. Set QGRAD_PREBUILT to a
# qgrad/_C*.so built by an earlier pass on the same image to skip the build.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: run_gpu.sh results_dir [build] [tests] [bench]}
shift
stages=${*:-build tests bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

run() {  # run NAME LIMIT CMD...: log to $out/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "stage $name: exit $rc after $((SECONDS - t0)) s"
    tail -n 15 "$out/$name.log"
    [ $rc -eq 0 ] || status=1
}

python - >"$out/env.txt" <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {tv}; "
      f"python {platform.python_version()}")
EOF
cat "$out/env.txt"

for stage in $stages; do
    case $stage in
    build)
        if [ -n "${QGRAD_PREBUILT:-}" ]; then
            cp "$QGRAD_PREBUILT" qgrad/
            QGRAD_BUILD_EXT=0 run build "${QGRAD_BUILD_LIMIT:-300}" \
                python -m pip install --no-build-isolation --no-deps -e .
        else
            TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} QGRAD_BUILD_EXT=1 \
                run build "${QGRAD_BUILD_LIMIT:-300}" python -m pip install --no-build-isolation --no-deps -e .
            cp qgrad/_C*.so "$out/" 2>/dev/null
        fi
        python -c "import qgrad; print('backends', qgrad.backends())" 2>&1 | tee -a "$out/env.txt"
        ;;
    tests)
        run tests "${QGRAD_TESTS_LIMIT:-240}" python -m pytest tests -q -n "${QGRAD_TEST_WORKERS:-8}" -rfE
        ;;
    bench)
        run bench_penalty_step "${QGRAD_BENCH_LIMIT:-300}" python -m pytest benchmarks/test_penalty_step.py \
            --benchmark-only --benchmark-json "$out/gpu_penalty_step.json" -q
        ;;
    profile)
        for model in resnet18 vgg_like; do
            run "profile_$model" "${QGRAD_PROFILE_LIMIT:-120}" python benchmarks/profile_penalty_step.py \
                --device cuda --width 1 --batch 128 --steps 5 --top 15 --model "$model" \
                --modes exact_autograd exact_qgrad worst_case
        done
        ;;
    *)
        echo "unknown stage $stage" >&2
        status=1
        ;;
    esac
done
exit $status
