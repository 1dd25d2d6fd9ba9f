# syntax=docker/dockerfile:1
# The amlfs operator: kopf + the search core. No PyTorch (the trainer image is trainer_image/Dockerfile).
#   docker build -t amlfs-operator:0.1.0 .
# Runs as uid 1000 with a read-only root filesystem: nothing is written outside /tmp (an emptyDir in the chart).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
# Only the `operator` extra; the direct dependencies pinned to the versions the test suite runs with.
RUN python -m venv /opt/amlfs \
 && /opt/amlfs/bin/pip install "pip==26.3" \
 && /opt/amlfs/bin/pip install ".[operator]" \
      "kopf==1.45.2" "kubernetes==37.0.1" "boto3==1.44.8" "prometheus-client==0.26.0" \
      "pydantic==2.14.4" "PyYAML==6.0.4" "rich==15.0.0"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="amlfs-operator" \
      org.opencontainers.image.description="AM-LFS loss-function search: the Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 1000 amlfs \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin amlfs
COPY --from=build /opt/amlfs /opt/amlfs
ENV PATH=/opt/amlfs/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 1000:1000
# 8080: /metrics (AMLFS_METRICS_PORT), 8081: /healthz (AMLFS_HEALTH_PORT)
EXPOSE 8080 8081
ENTRYPOINT ["amlfs-operator"]
