# syntax=docker/dockerfile:1
# One image for TorchServe (the default command), the ingestion job and the review desk (compose
# gives them other commands). See docs/DEPLOYMENT.md. Build: docker compose build
#   CPU (default):  docker build -t refund-classifier .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu126 -t refund-classifier:cuda .
#                   (any variant https://download.pytorch.org/whl/ lists for the pinned torch version)
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm
FROM ${PYTHON_IMAGE}

# cpu, or a CUDA variant of the PyTorch wheel index (cu121, cu124, cu126, ...): the versions stay
# the ones pinned in requirements.txt, only the build of torch/torchvision changes.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# The user the services run as. Build with the uid/gid that owns inbox/, processed/ and
# quarantine/ on the host (RC_UID/RC_GID in .env), so the job can move files there.
ARG RC_UID=10001
ARG RC_GID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RC_STATE_DIR=/app/.run

# TorchServe's frontend is Java. No curl: the HEALTHCHECK is Python.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
# torch/torchvision first, from the PyTorch index of the chosen variant, at the versions pinned in
# requirements.txt; then everything else from PyPI (2.x.y+cpu satisfies ==2.x.y).
RUN grep -E '^(torch|torchvision)==' requirements.txt > /tmp/torch-requirements.txt \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -r /tmp/torch-requirements.txt \
 && pip install --no-cache-dir -r requirements.txt \
 && rm /tmp/torch-requirements.txt

COPY handler/ handler/
COPY ingest/ ingest/
COPY review/ review/
COPY serving/ serving/
COPY training/ training/
COPY deploy/__init__.py deploy/healthcheck.py deploy/
# The container's TorchServe config (binds 0.0.0.0 inside, token authorization on) becomes the
# default config of `python -m serving`.
COPY deploy/config.properties config.properties

# --non-unique: the host's gid may exist in the image already (macOS's staff, 20, is Debian's dialout).
RUN groupadd --non-unique --gid "${RC_GID}" refund \
 && useradd --non-unique --uid "${RC_UID}" --gid "${RC_GID}" --create-home --shell /usr/sbin/nologin refund \
 && mkdir -p /app/model_store /app/.run/torchserve /app/.run/inference-key /app/.run/review \
 && chown -R refund:refund /app/model_store /app/.run
USER refund

VOLUME ["/app/model_store"]
# inference, management (never published by compose), metrics (Prometheus)
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=30s --timeout=15s --start-period=180s --retries=3 \
    CMD ["python", "-m", "deploy.healthcheck"]
# Stays attached to TorchServe and stops it on SIGTERM (docker stop).
CMD ["python", "-m", "serving", "up", "--foreground"]
