#!/usr/bin/env bash
# `make gpu-check`: the CUDA path, on a machine with a GPU (under 8 minutes on one H200).
#
# 1. the CUDA tests (tests/cuda, marked `cuda`): autocast parity with PEFT, QLoRA nf4 through
#    bitsandbytes' CUDA kernels, mixed batches, `lorafit train` and the serving engine on cuda;
# 2. bench/gpu.py: lorafit vs PEFT on a 1B-shaped random Llama in bf16, printed as JSON.
#
# The GPU machines lent here have their own Python with torch, transformers, peft, accelerate,
# safetensors and pyyaml, and no network: lorafit runs from src/ without installing anything, and
# wheels placed in .whl/ (scripts/gpu-wheels.sh fetches bitsandbytes') are installed first. What
# cannot run is skipped with one line saying why. Results go to $OUT (or ./gpu-check-out).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA device on this machine; nothing to check"
    exit 0
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/lorafit-wheels .whl/*.whl \
        && export PYTHONPATH=/tmp/lorafit-wheels
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/cuda -rs 2>&1 | tee "$OUT/cuda-tests.log" || status=1
timeout 240 "$PYTHON" bench/gpu.py --out "$OUT/gpu-bench.json" || status=1
exit $status
