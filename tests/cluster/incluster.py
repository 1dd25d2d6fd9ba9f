"""The test services inside a real cluster (AMLFS_TEST_CLUSTER=external): SeaweedFS S3, the Pushgateway and
Prometheus of tests/e2e/manifests, which tests/e2e/kind-up.sh applies.

The test process reaches each through its Service's NodePort on ``$AMLFS_E2E_HOST`` (default 127.0.0.1, where
tests/e2e/kind-config.yaml publishes them); pods and an in-cluster operator reach them by Service name. So the
objects here answer both questions: ``url``/``endpoint`` for this process, ``pod_url``/``pod_endpoint`` for pods.
They have the interface of the local ones (services.py, tests/support/s3.py), minus what only a local
Prometheus can do: this one discovers the operator and trainer pods itself (jobs ``amlfs-operator`` and
``amlfs-trainers``) and takes no registered targets.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.s3 import S3Server

from .services import Prometheus, Pushgateway, ServiceError, _http

MANIFESTS = Path(__file__).resolve().parents[1] / "e2e" / "manifests"
SETUP_HINT = "apply tests/e2e/manifests to the cluster (tests/e2e/kind-up.sh does) and publish their NodePorts"


def cluster_mode() -> str:
    """``$AMLFS_TEST_CLUSTER``: "local" (default) or "external"."""
    mode = os.environ.get("AMLFS_TEST_CLUSTER", "local")
    if mode not in ("local", "external"):
        raise pytest.UsageError(f"AMLFS_TEST_CLUSTER must be 'local' or 'external', not {mode!r}")
    return mode


def manifests() -> list[dict]:
    """Every object of tests/e2e/manifests, in `kubectl apply -f` order (files sorted by name)."""
    return [d for path in sorted(MANIFESTS.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]


def service(name: str) -> dict:
    (svc,) = [d for d in manifests() if d["kind"] == "Service" and d["metadata"]["name"] == name]
    return svc


def node_port(name: str) -> int:
    return service(name)["spec"]["ports"][0]["nodePort"]


def service_url(name: str) -> str:
    svc = service(name)
    return f"http://{name}.{svc['metadata']['namespace']}.svc:{svc['spec']['ports'][0]['port']}"


def host() -> str:
    return os.environ.get("AMLFS_E2E_HOST", "127.0.0.1")


def _wait_ready(what: str, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            code, body = _http(url, timeout=2)
            if code == 200:
                return
            last = f"HTTP {code}: {body[:200]!r}"
        time.sleep(0.5)
    raise ServiceError(f"{what} not ready at {url} after {timeout}s ({last or 'no answer'}): {SETUP_HINT}")


@dataclass
class ClusterPushgateway(Pushgateway):
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pod_url(self) -> str:
        return service_url("pushgateway")

    def start(self, timeout: float = 120) -> ClusterPushgateway:
        _wait_ready("the in-cluster Pushgateway", self.url + "/-/ready", timeout)
        return self


@dataclass
class ClusterPrometheus(Prometheus):
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120) -> ClusterPrometheus:
        _wait_ready("the in-cluster Prometheus", self.url + "/-/ready", timeout)
        return self

    def add_target(self, address: str, labels: dict[str, str] | None = None, **_: object) -> Path:
        raise ServiceError(
            f"the in-cluster Prometheus takes no registered targets ({address}): it discovers the operator and "
            "trainer pods itself (tests/e2e/manifests/prometheus.yaml)"
        )


@dataclass
class ClusterMonitoring:
    """The in-cluster Pushgateway and Prometheus, as services.Monitoring is the local pair."""

    workdir: Path

    def start(self) -> ClusterMonitoring:
        self.pushgateway = ClusterPushgateway(
            workdir=self.workdir / "pushgateway", port=node_port("pushgateway"), host=host()
        ).start()
        self.prometheus = ClusterPrometheus(
            workdir=self.workdir / "prometheus", port=node_port("prometheus"), host=host()
        ).start()
        return self

    def stop(self) -> None:
        """Nothing to stop: the services belong to the cluster."""


def cluster_s3(workdir: Path, timeout: float = 120) -> S3Server:
    """The in-cluster SeaweedFS with the suite's credentials and bucket (created when missing)."""
    server = S3Server(
        workdir,
        endpoint=f"http://{host()}:{node_port('seaweedfs')}",
        pod_endpoint=service_url("seaweedfs"),
    )
    try:
        return server.wait_ready(timeout)
    except RuntimeError as exc:
        raise ServiceError(f"{exc}: {SETUP_HINT}") from None
