# syntax=docker/dockerfile:1
# rdserve: one image for the API (`rdserve serve`, the default command) and the GPU worker
# (`rdserve worker --redis-url …`); see docker-compose.yml and docs/operations.md.
#
#   GPU image (default, CUDA 12.6 PyTorch):  docker build -t rdserve .
#   CPU-only image:  docker build -t rdserve:cpu \
#                      --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#
# Base image pinned by tag and by its multi-platform index digest (update the two together).
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3

# ---- builder: a virtual environment with PyTorch and the project installed -------------------
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# PyTorch first, from the PyTorch index (CUDA or CPU build): the project's `torch>=2.4` is then
# already satisfied and pip does not replace it with the PyPI build.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY client ./client
COPY models ./models
COPY app ./app
# A regular (non-editable) install: the runtime stage needs the venv only, not /src.
RUN pip install --no-cache-dir -c constraints.txt ./client . \
    && rdserve --help > /dev/null

# ---- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG RDSERVE_UID=10001
LABEL org.opencontainers.image.title="rdserve" \
      org.opencontainers.image.description="Reverse-distilled protein language model embeddings" \
      org.opencontainers.image.licenses="MIT"
# HF_HOME: Hugging Face model cache; RDSERVE_DATA_DIR: fitted artifacts; RDSERVE_CACHE_DIR:
# weights that do not come from the hub (UniRep). /data and /cache are volumes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    RDSERVE_DATA_DIR=/data \
    RDSERVE_CACHE_DIR=/cache/rdserve \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid "${RDSERVE_UID}" rdserve \
    && useradd --system --no-log-init --uid "${RDSERVE_UID}" --gid rdserve \
       --home-dir /home/rdserve --create-home --shell /usr/sbin/nologin rdserve \
    && mkdir -p /data/artifacts /cache/huggingface /cache/rdserve \
    && chown -R rdserve:rdserve /data /cache
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/rdserve-healthcheck
COPY --chmod=0755 docker/fit.sh /usr/local/bin/rdserve-fit
# Numeric, so that runtimes enforcing non-root (e.g. Kubernetes runAsNonRoot) can check it.
USER ${RDSERVE_UID}:${RDSERVE_UID}
WORKDIR /home/rdserve
VOLUME ["/data", "/cache"]
# 8000: the API; 9100: a worker's Prometheus endpoint (RDSERVE_METRICS_PORT).
EXPOSE 8000 9100
# GET $RDSERVE_HEALTH_URL, default /health/live of the API ($RDSERVE_PORT) or, when the container
# runs `rdserve worker`, of the worker's metrics port. start-period covers model downloads.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["rdserve-healthcheck"]
ENTRYPOINT ["rdserve"]
CMD ["serve", "--host", "0.0.0.0"]
