#!/usr/bin/env bash
# benchmarks/sweeps/gpu.yaml on one GPU, as one prepared run (about 8 minutes):
# teacher samples on the GPU, then every variant at once (benchmarks/sweep.py),
# distillation stopped at DEADLINE seconds, then scored.
#
# Needs the zoo and prompts (`dvc repro zoo prompts`, or carried over); dmm's
# Python dependencies either installed or as wheels in .whl/ (no network there).
#   OUT=/tmp/result benchmarks/gpu_sweep.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
OUT=${OUT:-benchmarks/out/gpu-sweep}
WORK=${WORK:-/tmp/dmm-sweep}
DEADLINE=${DEADLINE:-300}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 DVC_NO_ANALYTICS=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, diffusers, pydantic; print("torch", torch.__version__, "diffusers", diffusers.__version__, "cuda", torch.cuda.is_available())' || exit 3
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }
if [ -z "${SKIP_SAMPLES:-}" ]; then  # set it to reuse samples left by a previous run
stamp "sampling"
python3 -m dmm.cli sample --config params.yaml --zoo data/zoo --out data/samples --device cuda 2>&1 | tail -3 || exit 4
stamp "sampling (10 steps, 2 per prompt)"
python3 -m dmm.cli sample --config params.yaml --zoo data/zoo --out data/samples10 --device cuda \
    --set steps=10 --set samples_per_prompt=2 2>&1 | tail -2
fi
stamp "sweep"
python3 benchmarks/sweep.py "${SWEEP:-benchmarks/sweeps/gpu.yaml}" --work "$WORK" --jobs "${JOBS:-16}" \
    --deadline "$DEADLINE" --eval-set cache_dir="$WORK/cache" 2>&1 | tail -60
stamp "done"
cp "$WORK/sweep.json" "$OUT/" 2>/dev/null
(cd "$WORK" && tar czf "$OUT/runs.tgz" --exclude='checkpoints' --exclude='student*' \
    --exclude='cache' --exclude='*.png' --exclude='*.html' .) 2>/dev/null
ls -la "$OUT"
