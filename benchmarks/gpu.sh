#!/usr/bin/env bash
# SD1.5-sized DMM distillation throughput on one lent GPU, as one prepared run
# (under 8 minutes). Writes benchmarks/out/gpu.json and prints it.
#
#   benchmarks/gpu.sh                 # 2 teachers, batch 16 per teacher, bf16, SDPA
#   benchmarks/gpu.sh --fused-adamw   # extra flags go to benchmarks/bench_gpu.py
#   benchmarks/gpu.sh --dry-run       # CPU, tiny UNet, 2 steps: checks the Python part
#
# The lent machine has no network: this uses a Python whose torch sees CUDA
# ($PYTHON, else .venv/bin/python, else the system python3) and only creates a
# venv (with --system-site-packages, to reuse that torch) when packages that
# dmm needs are missing and pip can reach an index.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

dry_run=0
for arg in "$@"; do
    [[ "$arg" == "--dry-run" ]] && dry_run=1
done

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
has_deps() { "$1" -c 'import torch, diffusers, accelerate, safetensors, pydantic, tqdm, numpy' 2>/dev/null; }

PY=""
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" "$(command -v python3 || true)"; do
    [[ -n "$cand" && -x "$cand" ]] || continue
    if [[ $dry_run == 1 ]] || has_cuda "$cand"; then
        PY="$cand"
        break
    fi
done
if [[ -z "$PY" ]]; then
    echo "gpu.sh: no Python with a CUDA-enabled torch found (set PYTHON=...)" >&2
    exit 2
fi

if ! has_deps "$PY"; then
    VENV="$ROOT/.venv-gpu"
    echo "gpu.sh: $PY lacks dmm's dependencies; trying a venv at $VENV" >&2
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PY" -m venv --system-site-packages "$VENV"
    fi
    # torch comes from the system site-packages; never let pip replace it.
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "diffusers>=0.35" "accelerate>=1.0" "safetensors>=0.4" "pydantic>=2.6" tqdm numpy pyyaml; then
        echo "gpu.sh: pip could not install the dependencies (no network?)" >&2
        exit 2
    fi
    PY="$VENV/bin/python"
fi

echo "== python: $PY"
"$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)'
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# 470 s for the run leaves the rest of 8 minutes for the start-up above; the
# Python side also stops timing after --budget-s (default 420 s).
exec timeout 470 "$PY" benchmarks/bench_gpu.py "$@"
