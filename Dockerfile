# syntax=docker/dockerfile:1
# The tagger image: the live worker (`tagger worker`, the default command) and the trainer
# (`tagger train|evaluate|promote`), on Python 3.11 slim with CPU-only PyTorch, as a non-root
# user. docker-compose.yml builds it for the worker, trainer, model-init and publisher.
#
#   docker build -t tagger .
#   docker run --rm -e TAGGER_KAFKA=broker:9092 -e TAGGER_REDIS=redis://cache:6379/0 \
#              -v tagger-artifacts:/app/artifacts -p 6066:6066 tagger

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------- build stage
FROM python:${PYTHON_VERSION}-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CPU-only PyTorch first, from PyTorch's own index: the default wheel pulls in ~3 GB of CUDA
# libraries a CPU worker never uses. Its own layer, so code changes do not re-download it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY tagger ./tagger
COPY trainer ./trainer
COPY stream ./stream
# torch==2.13.0 (pinned in pyproject.toml) is already satisfied by the CPU wheel above.
RUN pip install . && pip check

# -------------------------------------------------------------------------- runtime stage
FROM python:${PYTHON_VERSION}-slim

RUN groupadd --system --gid 10001 tagger \
 && useradd --system --uid 10001 --gid tagger --home-dir /app --shell /usr/sbin/nologin tagger

COPY --from=build /opt/venv /opt/venv

# /app is the working directory and must be writable: Faust keeps <app_id>-data/ there.
# /app/artifacts is where the artifacts volume is mounted; creating it owned by `tagger`
# makes a fresh named volume start with that owner.
WORKDIR /app
RUN mkdir -p /app/artifacts && chown -R tagger:tagger /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    TAGGER_ARTIFACTS=/app/artifacts \
    TAGGER_WEB_PORT=6066 \
    TAGGER_METRICS_HOST=0.0.0.0

USER tagger

# Faust's web server: /metrics (Prometheus), /healthz (liveness), /readyz (readiness).
EXPOSE 6066

# Liveness: the worker's web server answers /healthz. (slim has no curl; Python does it.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TAGGER_WEB_PORT', '6066'), timeout=4)"]

CMD ["tagger", "worker"]
