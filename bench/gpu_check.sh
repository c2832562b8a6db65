#!/usr/bin/env bash
# The whole GPU validation in one call, sized for at most 8 minutes on an H100 / H200:
#   1. the kernel tests on CUDA tensors (pytest -m cuda: fp32 / fp16 / bf16, three seeds each), run twice
#      so that a race shows as a failure in one of the runs;
#   2. the attention, cross-entropy and MoE benches at the shapes of XLM-R base / large;
#   3. the throughput ladder (xlmr-base, xlmr-large; dense / MoE; XLT, XLT-torch, HF) and the kernel
#      micro-benchmarks (pytest-benchmark);
# then a one-screen summary. Everything goes to one folder: $OUT when set, else bench/results/gpu-<date>/.
#
#   XLT_COMMIT=<commit> bash bench/gpu_check.sh     (the commit written out: a copied tree has no .git)
#
# It installs nothing from a registry: packages come from the machine, or from wheels carried in .whl/
# (installed with --no-index into /tmp/site). Each stage has its own time limit (the number after its name), so
# one that hangs cannot eat the others' time (the limits add up to 7.7 minutes); a stage that fails or times out
# is marked in the summary and the rest still run. At its limit a stage gets SIGINT, not SIGTERM: Python raises
# KeyboardInterrupt, so pytest still prints the failures it met and the test it was in, and a bench the line it
# was at (SIGTERM would end either silently); SIGKILL follows 10 s later. Exit status: 0 when every stage
# passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # real kernels: the interpreter is for machines without a GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONFAULTHANDLER=1  # a crash in native code prints every thread's stack
OUT="${OUT:-bench/results/gpu-$(date -u +%Y%m%dT%H%M)}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
STATUS="$OUT/stages.tsv"
: >"$STATUS"
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log it, record its status and wall time
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    [ -n "$(tail -c 1 "$LOG")" ] && echo >>"$LOG"  # a stopped command may leave its last line unterminated
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$STATUS"
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

{
    echo "commit ${XLT_COMMIT:-unknown}; $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,memory.total \
        --format=csv 2>&1 || echo "nvidia-smi failed"
    "$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__,
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} 2>&1 | tee -a "$LOG"

# 0. What the rest needs imports here (no `datasets` on these machines: nothing on this path may need it).
stage imports 20 "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'
import kernels, models, bench.env, bench.attention, bench.cross_entropy, bench.moe, bench.throughput, bench.report"

# 1. Correctness on CUDA, twice (a race shows up as a difference between runs). The first run compiles and
#    autotunes every kernel (Triton's disk cache keeps them), so it gets the longer limit.
stage kernel-tests-1 140 "$PY" -m pytest -m cuda tests/kernels -q -p no:cacheprovider -rfE
stage kernel-tests-2 60 "$PY" -m pytest -m cuda tests/kernels -q -p no:cacheprovider -rfE

# 2. Kernel benches at XLM-R shapes (bf16).
stage attention 40 "$PY" -m bench.attention --device cuda --out "$OUT/attention_cuda.jsonl"
stage cross-entropy 40 "$PY" -m bench.cross_entropy --device cuda --out "$OUT/cross_entropy_cuda.jsonl"
stage moe 30 "$PY" -m bench.moe --device cuda --out "$OUT/moe_cuda.jsonl"

# 3. End-to-end training throughput, and the kernel micro-benchmarks.
stage throughput 100 "$PY" -m bench.throughput --device cuda --presets xlmr-base,xlmr-large --mixes xnli,full --steps 3 --repeats 2 \
    --results "$OUT/throughput_cuda.jsonl"
stage micro-benchmarks 30 "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/micro_benchmarks.json"

"$PY" -m bench.gpu_summary "$OUT" | tee "$OUT/summary.txt"
! awk -F'\t' '$2 != 0 {bad=1} END {exit !bad}' "$STATUS"
