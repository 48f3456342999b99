#!/usr/bin/env bash
# Training throughput on one lent CUDA GPU (issue 5): LoRA, QLoRA, DoRA, full + ZeRO-2 on a ~1B
# Gemma 3 shape with random weights; tokens/s, MFU (LoRA-aware FLOPs), peak memory. ~3-5 min on
# an H100. Rows whose packages (bitsandbytes, deepspeed) are missing on the machine are reported
# as skipped; carry wheels in .whl/ to install them (see bench/gpu_calibrate.sh).
# Output: the table on stdout and gpu-train.{md,json} in $OUT (device machine) or bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null && echo .venv/bin/python || echo python3)}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .tuneops/site .whl/*.whl
  export PYTHONPATH=".tuneops/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=true PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PYTHON" bench/gpu_train.py "$@"
