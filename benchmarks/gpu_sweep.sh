#!/usr/bin/env bash
# A sweep (benchmarks/sweep.py) on one GPU, as one prepared run: teacher
# samples on the GPU, then every variant at once, distillation stopped at
# DEADLINE seconds, then scored. Needs the zoo and prompts (`dvc repro zoo
# prompts`, or carried over) and dmm's Python dependencies, installed or as
# wheels in .whl/ (the GPU machine has no network).
#
#   OUT=/tmp/result SWEEP=benchmarks/sweeps/gpu.yaml benchmarks/gpu_sweep.sh
#
# SAMPLES lists the sample caches to build, each OUT[:KEY=VALUE,...] on top of
# params.yaml's `sample:` (default: data/samples); EVAL_SETS, KEY=VALUE
# overrides of the evaluation (space-separated). MPS=1 starts NVIDIA's
# multi-process service first (falling back to time slices if it will not
# start). On an H100, 16 time-sliced runs made about 24 five-teacher zoo steps/s
# in all; 4-8 runs under MPS made about 12, so MPS is off by default.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)
OUT=${OUT:-benchmarks/out/gpu-sweep}
WORK=${WORK:-/tmp/dmm-sweep}
DEADLINE=${DEADLINE:-300}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
    TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DVC_NO_ANALYTICS=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${MPS:-0}" = 1 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 90 python3 -c \
        'import torch; x = torch.ones(8, device="cuda"); print("mps ok", float(x.sum()))'; then
        stamp "MPS on"
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        stamp "MPS unavailable; time-sliced"
    fi
fi
python3 -c 'import torch, diffusers, pydantic; print("torch", torch.__version__, "diffusers", diffusers.__version__, "cuda", torch.cuda.is_available())' || exit 3
if [ -z "${SKIP_SAMPLES:-}" ]; then  # set it to reuse samples left by a previous run
    for spec in ${SAMPLES:-data/samples}; do
        dir=${spec%%:*}
        sets=()
        if [[ "$spec" == *:* ]]; then
            IFS=, read -ra kvs <<< "${spec#*:}"
            for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
        fi
        stamp "sampling into $dir ${sets[*]}"
        python3 -m dmm.cli sample --config params.yaml --zoo data/zoo --out "$dir" \
            --device "${SAMPLE_DEVICE:-cuda}" "${sets[@]}" 2>&1 | tail -2 || exit 4
    done
fi
# DEADLINE_AT: stop distilling this many seconds after the script started
# (whatever set-up and sampling took), leaving the rest of a call for scoring.
if [ -n "${DEADLINE_AT:-}" ]; then DEADLINE=$(( DEADLINE_AT - $(date +%s) + t0 )); fi
stamp "sweep (distillation stops after $DEADLINE s)"
python3 benchmarks/sweep.py "${SWEEP:-benchmarks/sweeps/gpu.yaml}" --work "$WORK" --jobs "${JOBS:-16}" \
    --deadline "$DEADLINE" --eval-set cache_dir="$WORK/cache" \
    $(for kv in ${EVAL_SETS:-}; do printf -- '--eval-set %s ' "$kv"; done) 2>&1 | tail -60
stamp "done"
cp "$WORK/sweep.json" "$OUT/" 2>/dev/null
(cd "$WORK" && tar czf "$OUT/runs.tgz" --exclude='checkpoints' --exclude='student*' \
    --exclude='cache' --exclude='*.png' --exclude='*.html' .) 2>/dev/null
ls -la "$OUT"
