# syntax=docker/dockerfile:1.7
# xrayops CPU image: servers (MLflow, Prefect), process workers, the API and the clinician UI.
# Build from the repository root:  docker build -f infra/docker/cpu.Dockerfile -t xrayops:cpu .
# The environment is installed from the committed uv.lock (--frozen): the same versions as CI.
FROM python:3.11-slim-bookworm

ARG UV_VERSION=0.13.9
ARG EXTRAS="--extra serve --extra ui --extra dask --extra server"

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
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false

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

# API, clinician UI, worker health check
EXPOSE 8000 8501 8080
CMD ["xrayops", "--help"]
