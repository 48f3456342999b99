#!/usr/bin/env bash
# Memory-planner calibration on one CUDA GPU: the same table as the CPU run, measured with
# torch.cuda.max_memory_allocated, on a ~1B Gemma 3 shape (bench/configs/gemma3-1b.json) and the
# 270M shape, random weights, nothing downloaded. ~3-6 minutes on one H100.
#
#   bench/gpu_calibrate.sh            # all GPU rows (bench/calibrate_memory.py GPU_CASES)
#   bench/gpu_calibrate.sh --quick    # 2 rows
#
# Python: $PYTHON, else .venv/bin/python when it sees a GPU, else python3 (the lent GPU
# machines' image has torch, transformers, peft; not deepspeed or bitsandbytes). Rows whose
# packages are missing are reported as skipped. To run them there, carry wheels in .whl/
# (see /work/.library/device/README.md); they are installed to .tuneops/site first.
# Output: the table on stdout, and calibration-gpu.{md,json} in $OUT (device machine) or
# bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .tuneops/site .whl/*.whl
  export PYTHONPATH=".tuneops/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" - <<'EOF'
import importlib.util, sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_calibrate.sh: torch sees no CUDA device")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB; "
      + ", ".join(f"{n} {'yes' if importlib.util.find_spec(n) else 'MISSING'}"
                  for n in ("transformers", "peft", "bitsandbytes", "deepspeed")))
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=true PYTHONUNBUFFERED=1
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
rc=0
"$PYTHON" bench/calibrate_memory.py --device cuda --json "$DEST/calibration-gpu.json" \
  --report "$DEST/calibration-gpu.md" "$@" || rc=$?
echo "gpu_calibrate.sh: exit $rc (0: all rows within 15%, 1: some outside, 2: a row failed to run)"
exit $rc
