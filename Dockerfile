# syntax=docker/dockerfile:1
# The amlfs operator: kopf + the search core. No PyTorch (the trainer image is trainer_image/Dockerfile).
#   docker build -t amlfs-operator:0.1.0 .
# Runs as uid 1000 with a read-only root filesystem: nothing is written outside /tmp (an emptyDir in the chart).
# Every Python package comes at the version pinned in constraints.txt, the versions the test suite runs with.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY operator/ operator/
# The venv's own pip and setuptools replaced by the pinned ones first (that pip has --build-constraint, which
# pins the build backend too); then only the `operator` extra.
RUN python -m venv /opt/amlfs \
 && /opt/amlfs/bin/pip install -c constraints.txt pip setuptools \
 && /opt/amlfs/bin/pip install -c constraints.txt --build-constraint constraints.txt ".[operator]"

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
