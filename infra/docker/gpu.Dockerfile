# syntax=docker/dockerfile:1.7
# xrayops GPU image: a Prefect process worker that trains on NVIDIA GPUs (tensorflow[and-cuda] wheels
# bring CUDA + cuDNN; the host needs the NVIDIA driver and the NVIDIA container toolkit).
# Build from the repository root:  docker build -f infra/docker/gpu.Dockerfile -t xrayops:gpu .
# The environment is installed from the committed uv.lock (--frozen): the same versions as CI.
FROM python:3.11-slim-bookworm

ARG UV_VERSION=0.13.9
ARG EXTRAS="--extra gpu --extra dask --extra server"

ENV UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TF_FORCE_GPU_ALLOW_GROWTH=true

# git: DVC versions data inside the project's git repository
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/* \
 && git config --system --add safe.directory /app \
 && pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /app
# dependencies first (cached layer), then the project itself
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project ${EXTRAS}
COPY pipeline ./pipeline
COPY flows ./flows
COPY params.yaml dvc.yaml ./
RUN uv sync --frozen --no-dev ${EXTRAS}

# worker health check
EXPOSE 8080
CMD ["xrayops", "--help"]
