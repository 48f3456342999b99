#!/usr/bin/env bash
# The image's install steps (Dockerfile RUN), also runnable into any fresh virtualenv:
#   docker/install.sh VENV_DIR
# TORCH_INDEX_URL: empty = pip's default index (CPU wheel where the index serves one);
# a CUDA image passes e.g. https://download.pytorch.org/whl/cu126 (Dockerfile build arg).
# Same order as the Makefile: torch first, deepspeed built against it without build isolation.
set -euo pipefail
VENV=${1:?usage: docker/install.sh VENV_DIR}
SRC=$(cd "$(dirname "$0")/.." && pwd)
TORCH=${TORCH_VERSION:-2.13.0}
python3.11 -m venv "$VENV"
PIP="$VENV/bin/pip --quiet --disable-pip-version-check"
$PIP install --upgrade pip 'setuptools>=77,<81' wheel
$PIP install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple} "torch==$TORCH"
$PIP install packaging numpy psutil py-cpuinfo ninja hjson msgpack einops pydantic "torch==$TORCH"
DS_BUILD_OPS=0 $PIP install --no-build-isolation --no-deps 'deepspeed==0.19.8'
# the project (not editable: the image is immutable) + the Prefect workers for Docker / Kubernetes pools
$PIP install "$SRC" 'prefect-docker>=0.6' 'prefect-kubernetes>=0.5' "torch==$TORCH"
"$VENV/bin/tuneops" --help >/dev/null
