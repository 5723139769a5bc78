#!/usr/bin/env bash
# One pass on a CUDA machine: record the environment, build qgrad._C with its CUDA kernels, run the test suite
# on the GPU, the benchmarks and the step profiles; everything goes to the folder given as $1.
#
#   bash benchmarks/run_gpu.sh results_dir [stage ...]
#
# Stages, in the order given (default: build tests bench):
#   build          pip install -e . with the CUDA extension (TORCH_CUDA_ARCH_LIST defaults to 9.0)
#   tests          python -m pytest tests, on QGRAD_TEST_WORKERS pytest-xdist workers
#   bench          benchmarks/test_penalty_step.py -> gpu_penalty_step.json (QGRAD_BENCH_K: a pytest -k selection)
#   bench_cl       the same with channels-last models and inputs -> gpu_penalty_step_channels_last.json
#   bench_graph    the same with every step's forward and backward replayed as a CUDA graph
#                  -> gpu_penalty_step_cuda_graph.json
#   bench_kernels  the fake-quantization and BatchNorm benchmarks -> gpu_kernels.json
#   profile        benchmarks/profile_penalty_step.py for both models at batch 128, ResNet-18 at batch 512 and
#                  the ImageNet ResNet-18 at batch 128 (plain, worst-case: why its eager step is 2.5x, not 2x)
#                  -> profile_<model>_b<batch>.md
# Every stage's output is appended to stages.log; each has a time limit in seconds (QGRAD_<STAGE>_LIMIT,
# e.g. QGRAD_TESTS_LIMIT=300) so that a slow one cannot starve the next, and a failed stage does not stop
# the others (the exit status is 1 if any failed).
set -uo pipefail
out=${1:?usage: run_gpu.sh results_dir [stage ...]}
shift
stages=${*:-build tests bench}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # a relative folder is the caller's, not the repository's
cd "$(dirname "$0")/.."
log="$out/stages.log"
export PYTHONUNBUFFERED=1
status=0
bench_k=${QGRAD_BENCH_K:-penalty_step}  # a pytest -k expression for bench / bench_cl / bench_graph, e.g. "not resnet18_imagenet"

run() {  # run NAME LIMIT CMD...: append the output to stages.log, print its tail, remember a failure
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "===== $name: $*" >>"$log"
    timeout "$limit" "$@" >"$out/.stage" 2>&1
    local rc=$?
    cat "$out/.stage" >>"$log"
    echo "stage $name: exit $rc after $((SECONDS - t0)) s"
    tail -n "${QGRAD_TAIL:-12}" "$out/.stage"
    rm -f "$out/.stage"
    [ $rc -eq 0 ] || status=1
}

python - >"$out/env.txt" <<'PY'
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {tv}; "
      f"python {platform.python_version()}")
PY
cat "$out/env.txt"

for stage in $stages; do
    case $stage in
    build)
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} QGRAD_BUILD_EXT=1 \
            run build "${QGRAD_BUILD_LIMIT:-300}" python -m pip install --no-build-isolation --no-deps -e .
        python -c "import qgrad; print('backends', qgrad.backends())" 2>&1 | tee -a "$out/env.txt"
        ;;
    tests)
        run tests "${QGRAD_TESTS_LIMIT:-240}" python -m pytest tests -q -n "${QGRAD_TEST_WORKERS:-8}" -rfE
        ;;
    bench)
        run bench "${QGRAD_BENCH_LIMIT:-300}" python -m pytest benchmarks/test_penalty_step.py \
            --benchmark-only --benchmark-json "$out/gpu_penalty_step.json" -q -k "$bench_k"
        ;;
    bench_cl)
        QGRAD_BENCH_LAYOUT=channels_last run bench_cl "${QGRAD_BENCH_LIMIT:-300}" python -m pytest \
            benchmarks/test_penalty_step.py --benchmark-only \
            --benchmark-json "$out/gpu_penalty_step_channels_last.json" -q -k "$bench_k"
        ;;
    bench_graph)
        QGRAD_BENCH_GRAPH=1 run bench_graph "${QGRAD_BENCH_LIMIT:-300}" python -m pytest \
            benchmarks/test_penalty_step.py --benchmark-only \
            --benchmark-json "$out/gpu_penalty_step_cuda_graph.json" -q -k "$bench_k"
        ;;
    bench_kernels)
        select=()  # QGRAD_BENCH_KERNELS_K: a pytest -k expression, e.g. "not torch_compile"
        [ -n "${QGRAD_BENCH_KERNELS_K:-}" ] && select=(-k "$QGRAD_BENCH_KERNELS_K")
        run bench_kernels "${QGRAD_BENCH_KERNELS_LIMIT:-300}" python -m pytest benchmarks/test_fake_quant_kernels.py \
            benchmarks/test_batch_norm.py --benchmark-only --benchmark-json "$out/gpu_kernels.json" -q "${select[@]}"
        ;;
    profile)
        for spec in resnet18:128 vgg_like:128 resnet18:512 resnet18_imagenet:128; do
            model=${spec%%:*} batch=${spec##*:}
            modes=(exact_autograd exact_qgrad worst_case)
            [ "$model" = resnet18_imagenet ] && modes=(plain worst_case)
            QGRAD_TAIL=2 run "profile_${model}_b$batch" "${QGRAD_PROFILE_LIMIT:-120}" \
                python benchmarks/profile_penalty_step.py --device cuda --width 1 --batch "$batch" --steps 5 \
                --top 15 --model "$model" --modes "${modes[@]}"
            sed -n "/^===== profile_${model}_b$batch/,\$p" "$log" | tail -n +2 >"$out/profile_${model}_b$batch.md"
        done
        ;;
    *)
        echo "unknown stage $stage" >&2
        status=1
        ;;
    esac
done
exit $status
