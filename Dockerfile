# tuneops image: the pipeline, `tuneops api`, a Prefect worker (and the flow runs a Docker or
# Kubernetes work pool starts). CPU torch by default; a CUDA build:
#   docker build -t tuneops:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# The install steps are docker/install.sh (tested outside Docker in tests/test_image.py).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false ORT_DISABLE_TELEMETRY=1 DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=60 \
    TORCH_EXTENSIONS_DIR=/app/.tuneops/torch-extensions \
    PATH=/opt/venv/bin:$PATH

# build tools for deepspeed's source install; git for DVC
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md /app/
COPY tuneops /app/tuneops
COPY tasks /app/tasks
COPY flows /app/flows
COPY docker /app/docker
RUN TORCH_INDEX_URL="$TORCH_INDEX_URL" TORCH_VERSION="$TORCH_VERSION" docker/install.sh /opt/venv
# the project files the stages and DVC read (data come through `dvc pull`, see entrypoint.sh)
COPY params.yaml dvc.yaml dvc.lock* prefect.yaml /app/
COPY .dvc/config /app/.dvc/config
COPY data /app/data
# no git in the image: DVC runs without SCM (the remote comes from .dvc/config or TUNEOPS_DVC_REMOTE)
RUN dvc config --local core.no_scm true

EXPOSE 8080 8000 4200
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["tuneops", "--help"]
