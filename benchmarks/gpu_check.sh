#!/usr/bin/env bash
# Everything this project checks and measures on a GPU, in one command, within 10 minutes:
#
#   bash benchmarks/gpu_check.sh OUTDIR                 # on a machine with a CUDA GPU, PyTorch and Triton
#   bash benchmarks/gpu_check.sh --collect-only OUTDIR  # anywhere: list the CUDA tests it would run
#
# Steps, each with its log in OUTDIR and a time budget in seconds (the variables below can be
# set to change them); a failed step does not stop the others, and the exit status is non-zero
# if any failed:
#   tests      the CUDA tests (pytest): the kernel in fp16/bf16/fp32 at every SD1.5 shape, the
#              CUDA dispatch, the λ = 0 properties on CUDA, torch.compile and CUDA graphs on
#              CUDA, a full-size UNet step fused vs the reference attention; junit XML in tests.xml
#   overhead   python -m ipadapter_min.benchmarks.overhead (host time per attention call)
#   attention  python -m ipadapter_min.benchmarks.attention --tune (attention.json, attention.png)
#   pipeline   python -m ipadapter_min.benchmarks.pipeline --compile at 512², fp16, 20 steps (pipeline.json,
#              pipeline.png; the JSON is written after each stage, so a step out of time keeps
#              what it measured); its random weights go to $WORKDIR, not OUTDIR
#
# diffusers and open_clip are optional. Without diffusers the pipeline benchmark times our side
# only. Without open_clip (whose BPE vocabulary our tokenizer reads) the λ = 0 tests and the
# pipeline benchmark use a stand-in tokenizer (one id per character).
# OUTDIR gets about a dozen files; `tar czf gpu-check.tgz -C OUTDIR .` packs them.
set -euo pipefail

# Budgets: guesses for an H100/H200 (no GPU was at hand when they were set), 560 s in all.
TESTS_S=${TESTS_S:-150}
OVERHEAD_S=${OVERHEAD_S:-20}
ATTENTION_S=${ATTENTION_S:-180}
PIPELINE_S=${PIPELINE_S:-210}
WORKDIR=${WORKDIR:-/tmp/ipadapter_min_pipeline_bench}
PYTHON=${PYTHON:-python3}

collect_only=0
if [[ ${1:-} == --collect-only ]]; then
    collect_only=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--collect-only] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1

# The CUDA tests: CUDA-only tests and the CUDA parametrizations (ids with "cuda") of these files.
TEST_FILES=(tests/test_kernel.py tests/test_lambda_zero.py tests/test_compile.py tests/test_cuda.py)
SELECT="cuda or bf16 or on_a_gpu or sd15_head_dims"
PYTEST=("$PYTHON" -m pytest "${TEST_FILES[@]}" -k "$SELECT" -p no:cacheprovider -q -rs --basetemp="$out/pytest-tmp")

if ((collect_only)); then
    exec "${PYTEST[@]}" --collect-only
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: $PYTHON cannot import torch, or torch sees no CUDA device" >&2
    exit 2
fi

{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi || true
    "$PYTHON" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" || true
    for package in pytest hypothesis diffusers transformers open_clip matplotlib; do
        "$PYTHON" -c "import $package; print('$package', getattr($package, '__version__', '?'))" 2>/dev/null ||
            echo "$package: not installed"
    done
} >"$out/environment.txt" 2>&1

failed=()
step() {  # step NAME BUDGET COMMAND...: COMMAND's output to OUTDIR/NAME.log, killed after BUDGET seconds
    local name=$1 budget=$2 started=$SECONDS status=0
    shift 2
    echo "== $name (at most ${budget} s): $*"
    timeout --kill-after=5 "$budget" "$@" >"$out/$name.log" 2>&1 || status=$?
    if ((status == 0)); then
        echo "   ok in $((SECONDS - started)) s"
    else
        failed+=("$name")
        echo "   FAILED (exit $status$( ((status == 124)) && echo ": out of time")) after $((SECONDS - started)) s; see $out/$name.log"
    fi
}

if "$PYTHON" -c "import pytest, hypothesis" 2>/dev/null; then
    step tests "$TESTS_S" "${PYTEST[@]}" --junitxml="$out/tests.xml"
    grep -E "passed|failed|error" "$out/tests.log" | tail -1 || true
    [[ " ${failed[*]-} " == *" tests "* ]] || rm -rf "$out/pytest-tmp"
else
    failed+=(tests)
    echo "== tests: NOT RUN: pytest and hypothesis are needed ($PYTHON -m pip install pytest hypothesis)"
fi
step overhead "$OVERHEAD_S" "$PYTHON" -m ipadapter_min.benchmarks.overhead
step attention "$ATTENTION_S" "$PYTHON" -m ipadapter_min.benchmarks.attention --tune --out "$out/attention.json"
step pipeline "$PIPELINE_S" "$PYTHON" -m ipadapter_min.benchmarks.pipeline --compile --steps 20 --repeats 2 --loading-repeats 1 \
    --workdir "$WORKDIR" --out "$out/pipeline.json"

if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (logs in $out)"
    exit 1
fi
echo "all steps passed; results in $out"
