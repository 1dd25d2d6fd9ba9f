"""Fixtures: a real Kubernetes cluster for tests.

``AMLFS_TEST_CLUSTER`` chooses where:

* ``local`` (default): a control plane started here (etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler; see controlplane.py) plus the
  process kubelet (kubelet/), one per test session.  Missing binaries are
  built by tests/cluster/build.sh (slow the first time on a machine).
* ``external``: the cluster in ``$KUBECONFIG`` (e.g. kind, see
  tests/e2e/kind-up.sh); nothing is started, and pods run in real
  containers from ``$AMLFS_TEST_IMAGE`` (default ``amlfs-trainer:dev``),
  the operator's from ``$AMLFS_TEST_OPERATOR_IMAGE`` (default
  ``amlfs-operator:dev``).

S3 (``s3_server``), the Pushgateway and Prometheus (``monitoring``) follow
the same choice: local processes (tests/support/s3.py, services.py) next to
the local control plane, whose pods share this host's network; on an
external cluster the services of tests/e2e/manifests running inside it
(incluster.py), which pods reach by Service name and this process through
their NodePorts. Each object tells both addresses apart (``endpoint`` /
``pod_endpoint``, ``url`` / ``pod_url``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.s3 import S3Server, start_s3

from .controlplane import ControlPlane, ensure_binaries
from .incluster import ClusterMonitoring, cluster_mode, cluster_s3
from .kubelet import ProcessKubelet
from .services import Monitoring

#: image -> entrypoint for containers without ``command`` (local mode only);
#: extend with AMLFS_IMAGE_COMMANDS='{"image": ["cmd", ...]}'.
DEFAULT_IMAGE_COMMANDS = {"amlfs-trainer": ["amlfs-trainer"], "amlfs-operator": ["amlfs-operator"]}

#: what the local control plane's audit log keeps: LISTs of pods (which client lists pods how often), nothing else
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],  # one event per request, when it is answered
    "rules": [
        {"level": "Metadata", "verbs": ["list"], "resources": [{"group": "", "resources": ["pods"]}]},
        {"level": "None"},
    ],
}


@dataclass
class Cluster:
    mode: str  # "local" | "external"
    kubeconfig: Path
    kubectl_bin: str
    helm_bin: str
    image: str
    controlplane: ControlPlane | None = None
    kubelet: ProcessKubelet | None = None
    _api: object = field(default=None, repr=False)

    @property
    def api_client(self):
        """An admin kubernetes.client.ApiClient."""
        if self._api is None:
            from kubernetes import client, config

            cfg = client.Configuration()
            config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
            self._api = client.ApiClient(cfg)
        return self._api

    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
        return proc

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def wait_pod(self, namespace: str, name: str, phases=("Succeeded", "Failed"), timeout: float = 120) -> dict:
        """Poll until the pod exists and its phase is one of ``phases``;
        returns the pod as a dict."""
        from kubernetes.client.exceptions import ApiException

        core = self.core()
        deadline = time.monotonic() + timeout
        last = "not created yet"
        while time.monotonic() < deadline:
            try:
                pod = core.read_namespaced_pod(name, namespace)
            except ApiException as e:
                if e.status != 404:
                    raise
            else:
                if pod.status.phase in phases:
                    return self.api_client.sanitize_for_serialization(pod)
                last = self.api_client.sanitize_for_serialization(pod.status)
            time.sleep(0.2)
        raise TimeoutError(f"pod {namespace}/{name} not in {phases} after {timeout}s: {last}")

    def crash_trainer(self, namespace: str, name: str) -> None:
        """Make a running trainer pod fail, as a crash would: the process kubelet kills its container with exit
        code 1; in a real container the trainer (PID 1, which nothing inside its PID namespace can SIGKILL)
        gets SIGINT, for which Python has a handler: KeyboardInterrupt, exit code 130."""
        if self.kubelet is not None:
            self.kubelet.fail_pod(namespace, name, exit_code=1)
            return
        self.kubectl(
            "exec", "-n", namespace, name, "--", "python", "-c", "import os, signal; os.kill(1, signal.SIGINT)"
        )

    def wait_crd(self, name: str, timeout: float = 60) -> None:
        """Wait for a CRD to be Established. Right after its creation `kubectl wait` can fail at once because the
        CRD has no status conditions yet ("<nil> is of the type <nil>"): that is retried."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=10s", check=False)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"crd/{name} not Established after {timeout}s: {r.stderr}")
            time.sleep(0.3)

    def wait_gone(self, namespace: str, name: str, kind: str = "pod", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.kubectl("get", kind, name, "-n", namespace, "--ignore-not-found", "-o", "name", check=False)
            if r.returncode == 0 and not r.stdout.strip():
                return
            time.sleep(0.3)
        raise TimeoutError(f"{kind} {namespace}/{name} still there after {timeout}s")


def _image_commands() -> dict[str, list[str]]:
    cmds = dict(DEFAULT_IMAGE_COMMANDS)
    extra = os.environ.get("AMLFS_IMAGE_COMMANDS")
    if extra:
        cmds.update(json.loads(extra))
    return cmds


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    mode = cluster_mode()
    image = os.environ.get("AMLFS_TEST_IMAGE", "amlfs-trainer:dev")
    if mode == "external":
        kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        kubectl, helm = shutil.which("kubectl"), shutil.which("helm")
        if kubectl is None or helm is None:
            bindir = ensure_binaries()
            kubectl, helm = kubectl or str(bindir / "kubectl"), helm or str(bindir / "helm")
        yield Cluster("external", Path(kubeconfig.split(os.pathsep)[0]), kubectl, helm, image)
        return
    base = tmp_path_factory.mktemp("cluster")
    cp = ControlPlane(workdir=base / "controlplane", audit_policy=AUDIT_POLICY)
    cp.start()
    kubelet = None
    try:
        kubelet = ProcessKubelet(
            cp.kubelet_kubeconfig,
            workdir=base / "kubelet",
            gpus=2,
            image_commands=_image_commands(),
            ca_file=cp.ca_file,
        )
        kubelet.start()
        print(
            f"\n[cluster] control plane ready in {cp.startup_seconds:.1f}s "
            f"(incl. binaries check {cp.total_seconds:.1f}s); KUBECONFIG={cp.kubeconfig}",
            file=sys.stderr,
        )
        yield Cluster(
            "local",
            cp.kubeconfig,
            str(cp.kubectl_path),
            str(cp.helm_path),
            image,
            controlplane=cp,
            kubelet=kubelet,
        )
    finally:
        if kubelet is not None:
            kubelet.stop()
        cp.stop()


@pytest.fixture
def namespace(cluster: Cluster):
    """A fresh namespace (its default ServiceAccount already made), deleted
    afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no default ServiceAccount in {name}")
        time.sleep(0.2)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def process_kubelet(cluster: Cluster) -> ProcessKubelet:
    """The process kubelet (local mode only: these tests drive it directly)."""
    if cluster.kubelet is None:
        pytest.skip("needs the local process kubelet (AMLFS_TEST_CLUSTER=local)")
    return cluster.kubelet


@pytest.fixture(scope="session")
def monitoring(tmp_path_factory) -> Monitoring | ClusterMonitoring:
    """The Pushgateway and Prometheus: local processes, or those inside the external cluster."""
    workdir = tmp_path_factory.mktemp("monitoring")
    m = ClusterMonitoring(workdir) if cluster_mode() == "external" else Monitoring(workdir=workdir)
    m.start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """S3 for the cluster tests (overrides tests/conftest.py's): a local SeaweedFS, or the one inside the
    external cluster (``endpoint`` for this process, ``pod_endpoint`` for pods)."""
    workdir = tmp_path_factory.mktemp("s3")
    if cluster_mode() == "external":
        yield cluster_s3(workdir)
        return
    server = start_s3(workdir)
    try:
        yield server
    finally:
        server.stop()
