#!/usr/bin/env bash
# Issue 17 on a GPU, in one command of under 10 minutes (sized for one H100 / H200):
#   1. the CUDA tests: packed FlashAttention-varlen batches vs padded SDPA, pinned pipelined
#      copies vs the CPU results, compiled levels without recompiles, real OOM split and retry;
#   2. python -m benchmarks.gpu, every arm of the target table, JSON written after each arm.
#
# Here, once (copies the data the tests and the benchmark read into .gpu/, which git ignores):
#   benchmarks/gpu_run.sh --prepare
# On the lent machine (its python3 holds torch, transformers, safetensors, httpx and pytest;
# nothing else is needed), carrying .gpu:
#   benchmarks/gpu_run.sh "$OUT"        # → $OUT/gpu-fastpath.json, gpu-fastpath.log, gpu-tests.log
# then copy those into benchmarks/results/ and the numbers into docs/performance.md (GPU section).
# (benchmarks/results/gpu.json is the first H100 run, in the layout benchmarks/capacity.py reads.)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    src=${RDSERVE_SHARED_DATA:-../shared/data}
    mkdir -p .gpu/shared/sequences .gpu/shared/esm2
    cp "$src/sequences/uniref90_sample_10k.fasta" .gpu/shared/sequences/
    cp -r "$src"/esm2/esm2_t* .gpu/shared/esm2/
    grep -qxF /.gpu/ .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
    du -sh .gpu
    exit 0
fi

out=${1:-benchmarks/results}
mkdir -p "$out"
export RDSERVE_SHARED_DATA=${RDSERVE_SHARED_DATA:-$PWD/.gpu/shared}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
t0=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-tests.log"
$py -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
    | tee -a "$out/gpu-tests.log"

# 1. Correctness on the device first (≈ 2–3 min; a failure is logged, the benchmark still runs).
timeout 200 $py -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee -a "$out/gpu-tests.log"

# 2. Every arm; each one is skipped, and says so in the JSON, when the time budget is spent.
left=$((560 - (SECONDS - t0)))
timeout $((left + 20)) $py -m benchmarks.gpu --time-budget "$((left - 15))" --out "$out/gpu-fastpath.json" \
    2>&1 | tee "$out/gpu-fastpath.log"
echo "gpu_run.sh: $((SECONDS - t0)) s"
