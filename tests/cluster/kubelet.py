"""A process "kubelet" for tests: runs the pods of one Node as local processes.

TEST HARNESS ONLY.  It talks to a real kube-apiserver (with the ``kubernetes``
client's ApiClient) the way a kubelet does:

* registers a Node with capacity/allocatable (cpu, memory, pods,
  ``nvidia.com/gpu``), Ready conditions, InternalIP 127.0.0.1 and a kubelet
  endpoint, and keeps its Lease in ``kube-node-lease`` fresh;
* binds unscheduled pods to itself when ``bind_pods=True`` (use that only
  when no kube-scheduler runs), after a simple resource-fit check;
* runs each pod's init containers (in order) and containers as local
  processes (one process group each): ``command``/``args`` with ``$(VAR)``
  expansion, ``env`` (literal, ``secretKeyRef``, ``configMapKeyRef``,
  ``fieldRef``, ``resourceFieldRef``), ``envFrom``, ``workingDir``; a
  container without ``command`` runs ``image_commands[image]`` (the image's
  entrypoint) followed by its ``args``;
* volumes: emptyDir, configMap, secret, downwardAPI, projected (incl. the
  ``kube-api-access-*`` service-account volume the ServiceAccount admission
  plugin adds: a pod-bound token from the TokenRequest API, refreshed at 80%
  of its lifetime, plus ``ca.crt`` and ``namespace``) and hostPath are
  written to ``<pod dir>/volumes/<name>``.  With ``mount_namespaces`` (the
  default as root) every container runs in a private mount namespace
  (``unshare --mount``) with its volumeMounts bind-mounted at their
  ``mountPath`` (read-only where Kubernetes makes them so), so the token is
  at ``/var/run/secrets/kubernetes.io/serviceaccount`` and
  ``load_incluster_config()`` works unchanged.  Missing mount points are
  created on the host (empty) and left there.  Every container also gets:

  - ``KUBERNETES_SERVICE_HOST=127.0.0.1``, ``KUBERNETES_SERVICE_PORT(_HTTPS)``
    = the apiserver's port (like a real pod's service env),
  - ``AMLFS_SA_DIR=<dir>`` when it mounts the token volume: where token,
    ca.crt and namespace are (the mountPath with mount namespaces, else the
    host directory; ``InClusterConfigLoader(token_filename=$AMLFS_SA_DIR/token,
    cert_filename=$AMLFS_SA_DIR/ca.crt).load_and_set()`` works in both),
  - without mount namespaces: ``KUBECONFIG=<pod dir>/sa-kubeconfig``
    (``tokenFile``), so clients that fall back from in-cluster config to a
    kubeconfig (``kubernetes.config.load_config()``, kopf's login) act as the
    pod's ServiceAccount,
  - without mount namespaces, ``AMLFS_POD_VOLUMES``: JSON
    ``{mountPath: host dir}`` of its mounts.

  The kubelet's own (admin) KUBECONFIG is never passed to pods.
* the termination message: each container instance gets a fresh file whose
  path is in ``AMLFS_TERMINATION_LOG`` (with mount namespaces
  ``/run/amlfs-pod/termination-log`` on a private tmpfs, also bind-mounted at
  ``terminationMessagePath`` when that file exists on the host; it is never
  created there); its content (max 4096 bytes) becomes
  ``state.terminated.message``; ``FallbackToLogsOnError`` uses the log tail;
* reports real status: ``Pending`` -> ``Running`` -> ``Succeeded``/``Failed``,
  container states with exit codes, ``restartCount``/``lastState``; honours
  ``restartPolicy`` (Always/OnFailure/Never, with a short restart back-off),
  ``activeDeadlineSeconds`` (``DeadlineExceeded``) and deletion (SIGTERM to
  the process group, the grace period, SIGKILL, final status, then a delete
  with grace 0);
* keeps each container's output in ``<pod dir>/logs/<container>/<n>.log``
  (``log_path()``/``logs()``), and serves it to ``kubectl logs`` via an HTTPS
  ``/containerLogs`` endpoint the apiserver proxies to;
* ``fail_pod()`` makes containers exit with a given code (a crash),
  ``evict_pod()`` kills a pod the way the kubelet's eviction manager does
  (``phase=Failed``, ``reason=Evicted``, DisruptionTarget condition).

Pod processes inherit the kubelet's environment (PATH, with the Python venv's
bin directory first, so ``python``/``amlfs-trainer`` resolve to the venv)
minus ``KUBECONFIG``, and die with the kubelet (``setpriv --pdeathsig``).
Pods share the host network (podIP = 127.0.0.1).  Not supported: probes
(containers are Ready once started), exec/attach/port-forward, Services,
sidecar init containers, PVCs, resource limits enforcement, image pulls.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.server
import json
import logging
import os
import platform
import queue
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("amlfs.kubelet")

SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
GPU_RESOURCE = "nvidia.com/gpu"
TERMINAL = ("Succeeded", "Failed")
MAX_TERMINATION_MESSAGE = 4096
#: where a container in its own mount namespace finds its termination-message
#: file (AMLFS_TERMINATION_LOG): a private tmpfs, so no volume can hide it
IN_POD_TERMINATION_LOG = "/run/amlfs-pod/termination-log"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str) -> float:
    return dt.datetime.strptime(s[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()


def parse_quantity(q: Any) -> float:
    from kubernetes.utils import parse_quantity as pq

    return float(pq(str(q)))


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced,
    undefined references are left as they are, ``$$`` escapes ``$``."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "$" and i + 1 < n:
            nxt = s[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                j = s.find(")", i + 2)
                if j != -1:
                    name = s[i + 2 : j]
                    out.append(env[name] if name in env else s[i : j + 1])
                    i = j + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


class ConfigError(Exception):
    """A container cannot be started yet (missing secret, configmap, key)."""


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


# --------------------------------------------------------------------------
# a thin REST layer over the kubernetes client's ApiClient (raw JSON dicts)


class Rest:
    def __init__(self, kubeconfig: str | os.PathLike):
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        self.configuration = cfg
        self._local = threading.local()

    @property
    def api(self):
        from kubernetes import client

        if not hasattr(self._local, "api"):
            self._local.api = client.ApiClient(self.configuration)
        return self._local.api

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict | None = None,
        content_type: str = "application/json",
        timeout: float | None = 30,
        stream: bool = False,
    ):
        """One API call; returns the decoded JSON body (or, with stream=True,
        the open urllib3 response). Non-2xx answers raise ApiError."""
        api = self.api
        headers = {"Accept": "application/json", "Content-Type": content_type}
        req = api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = api.call_api(*req, _request_timeout=timeout)
        raw = resp.response
        if not 200 <= resp.status <= 299:
            data = raw.data
            raw.release_conn()
            raise ApiError(resp.status, data.decode(errors="replace") if data else "")
        if stream:
            return raw
        try:
            data = raw.data
        finally:
            raw.release_conn()
        return json.loads(data) if data else {}

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def get_or_none(self, path: str):
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def merge_patch(self, path: str, body: dict):
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")


def _iter_lines(resp, chunk: int = 65536):
    buf = b""
    for data in resp.stream(chunk, decode_content=True):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
    if buf.strip():
        yield buf


# --------------------------------------------------------------------------
# runtime state


@dataclass
class Container:
    name: str
    spec: dict
    init: bool
    logdir: Path
    term_file: Path
    popen: subprocess.Popen | None = None
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    restart_count: int = 0
    instances: int = 0
    last_state: dict | None = None
    next_start: float = 0.0  # monotonic time the next (re)start may happen
    forced_exit: int | None = None  # fail_pod: report this code on exit
    forced_reason: str | None = None
    ever_ran: bool = False

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{max(self.instances - 1, 0)}.log"

    def terminated_state(self) -> dict:
        st = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.message:
            st["message"] = self.message
        return {k: v for k, v in st.items() if v is not None}

    @property
    def container_id(self) -> str | None:
        return f"process://{self.popen.pid}" if self.popen is not None else None

    def status(self) -> dict:
        if self.state == "running":
            state = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_state()}
        else:
            state = {"waiting": {k: v for k, v in (("reason", self.reason), ("message", self.message)) if v}}
        st = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "process://" + self.spec.get("image", ""),
            "ready": self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": self.last_state or {},
        }
        if self.popen is not None:
            st["containerID"] = self.container_id
        return st


@dataclass
class PodRuntime:
    uid: str
    namespace: str
    name: str
    pod: dict
    dir: Path
    init_containers: list[Container]
    containers: list[Container]
    start_time: str
    started_mono: float
    phase: str = "Pending"
    reason: str | None = None
    message: str | None = None
    extra_conditions: list[dict] = field(default_factory=list)
    terminating: bool = False
    kill_at: float = 0.0
    finished: bool = False  # processes stopped, final status computed
    removed: bool = False  # deleted from the API (or gone)
    last_status: str = ""
    sa_volume: str | None = None  # the projected volume with the SA token
    sa_token_source: dict | None = None
    sa_refresh_at: float = 0.0
    prepared: bool = False  # volumes written
    gpus: list[int] = field(default_factory=list)
    volumes: dict[str, Path] = field(default_factory=dict)  # volume name -> host dir
    read_only: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def all_containers(self) -> list[Container]:
        return self.init_containers + self.containers


# --------------------------------------------------------------------------
# the kubelet


class ProcessKubelet:
    def __init__(
        self,
        kubeconfig: str | os.PathLike,
        *,
        node_name: str = "amlfs-node",
        cpu: str = "8",
        memory: str = "32Gi",
        pods: int = 110,
        gpus: int = 0,
        image_commands: dict[str, list[str]] | None = None,
        workdir: str | os.PathLike | None = None,
        bind_pods: bool = False,
        apiserver_host: str = "127.0.0.1",
        apiserver_port: int | None = None,
        ca_file: str | os.PathLike | None = None,
        restart_backoff: tuple[float, float] = (1.0, 10.0),
        labels: dict[str, str] | None = None,
        extra_env: dict[str, str] | None = None,
        lease_seconds: int = 40,
        mount_namespaces: bool | None = None,
    ):
        self.kubeconfig = Path(kubeconfig)
        self.node_name = node_name
        self.capacity = {
            "cpu": str(cpu),
            "memory": str(memory),
            "pods": str(pods),
            "ephemeral-storage": "100Gi",
        }
        if gpus:
            self.capacity[GPU_RESOURCE] = str(gpus)
        self.gpu_count = int(gpus)
        self.image_commands = dict(image_commands or {})
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="amlfs-kubelet-"))
        self.bind_pods = bind_pods
        self.rest = Rest(self.kubeconfig)
        parsed = urllib.parse.urlparse(self.rest.configuration.host)
        self.apiserver_host = apiserver_host
        self.apiserver_port = apiserver_port or parsed.port or 443
        self.ca_file = (
            Path(ca_file)
            if ca_file
            else (Path(self.rest.configuration.ssl_ca_cert) if self.rest.configuration.ssl_ca_cert else None)
        )
        self.restart_backoff = restart_backoff
        self.labels = dict(labels or {})
        self.extra_env = dict(extra_env or {})
        self.lease_seconds = lease_seconds
        #: bind-mount volumes at their mountPath in a private mount namespace
        #: per container (None: when this machine allows it, i.e. as root)
        self.mount_namespaces = _mount_namespaces_work() if mount_namespaces is None else mount_namespaces
        self._pdeathsig = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []

        self._cache: dict[str, dict] = {}  # uid -> pod
        self._cache_lock = threading.Lock()
        self._runtimes: dict[str, PodRuntime] = {}
        self._commands: queue.Queue[tuple[Callable[[], Any], threading.Event, list]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._bind_attempts: dict[str, float] = {}
        self._deleted: set[str] = set()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._watch_resp = None
        self._started = False
        self.synced = threading.Event()

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> ProcessKubelet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> ProcessKubelet:
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        self._start_log_server()
        self._register_node()
        self._renew_lease()
        for target, name in (
            (self._informer_loop, "informer"),
            (self._worker_loop, "worker"),
            (self._heartbeat_loop, "heartbeat"),
        ):
            t = threading.Thread(target=target, name=f"kubelet-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._started = True
        if not self.synced.wait(30):
            raise RuntimeError("process kubelet: pod informer did not sync within 30s")
        return self

    def stop(self, grace: float = 2.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        resp = self._watch_resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown() if hasattr(resp, "shutdown") else resp.close()
        for t in self._threads:
            t.join(timeout=5)
        # Kill every process we started, whatever state the worker left.
        conts = [c for rt in self._runtimes.values() for c in rt.all_containers() if c.popen is not None]
        for c in conts:
            _signal_group(c.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in conts:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for c in conts:
            _signal_group(c.popen, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.popen.wait(timeout=5)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._own_workdir and not os.environ.get("AMLFS_KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- public test API ------------------------------------------------------

    def fail_pod(
        self, namespace: str, name: str, exit_code: int = 1, container: str | None = None, timeout: float = 15
    ) -> None:
        """Make the pod's running container(s) exit now with ``exit_code`` (a
        crash: SIGKILL, reported as ``reason=Error`` and the given code). The
        restart policy then applies as for any exit."""

        def op():
            rt = self._runtime_by_name(namespace, name)
            hit = False
            for c in rt.all_containers():
                if (container is None or c.name == container) and c.state == "running":
                    c.forced_exit = exit_code
                    c.forced_reason = "Error"
                    _signal_group(c.popen, signal.SIGKILL)
                    hit = True
            if not hit:
                raise RuntimeError(
                    f"pod {namespace}/{name} has no running container" + (f" {container}" if container else "")
                )
            deadline = time.monotonic() + 5
            for c in rt.all_containers():
                if c.forced_exit is not None and c.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        c.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            self._sync_runtime(rt)

        self._run_in_worker(op, timeout)

    def evict_pod(
        self,
        namespace: str,
        name: str,
        message: str = "The node was low on resource: memory. ",
        timeout: float = 15,
    ) -> None:
        """Evict like the kubelet's eviction manager (hard threshold): kill
        the containers at once, then ``phase=Failed``, ``reason=Evicted`` and a
        ``DisruptionTarget`` condition. The Pod object stays (as for a real
        eviction); its owner controller reacts to the failure."""

        def op():
            rt = self._runtime_by_name(namespace, name)
            if rt.finished:
                raise RuntimeError(f"pod {namespace}/{name} already finished")
            self._kill_all(rt, grace=0)
            for c in rt.all_containers():
                if c.state != "terminated":
                    self._finish_container(c, default_code=137)
                    c.reason = "Error"
            rt.extra_conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "TerminationByKubelet",
                    "message": message.strip(),
                    "lastTransitionTime": now_rfc3339(),
                }
            )
            self._finish_pod(rt, "Failed", reason="Evicted", message=message)
            self._write_status(rt)

        self._run_in_worker(op, timeout)

    def log_path(self, namespace: str, name: str, container: str | None = None, previous: bool = False) -> Path:
        rt = self._runtime_by_name(namespace, name)
        conts = rt.all_containers()
        c = next((c for c in conts if c.name == container), None) if container else (rt.containers or conts)[0]
        if c is None:
            raise KeyError(f"pod {namespace}/{name} has no container {container}")
        n = c.instances - (2 if previous else 1)
        return c.logdir / f"{max(n, 0)}.log"

    def logs(self, namespace: str, name: str, container: str | None = None, previous: bool = False) -> str:
        p = self.log_path(namespace, name, container, previous)
        return p.read_text(errors="replace") if p.exists() else ""

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self._runtime_by_name(namespace, name).dir

    def pids(self) -> list[int]:
        return [
            c.popen.pid
            for rt in list(self._runtimes.values())
            for c in rt.all_containers()
            if c.popen is not None and c.popen.poll() is None
        ]

    def _runtime_by_name(self, namespace: str, name: str) -> PodRuntime:
        found = [rt for rt in list(self._runtimes.values()) if rt.namespace == namespace and rt.name == name]
        if not found:
            raise KeyError(f"process kubelet runs no pod {namespace}/{name}")
        return max(found, key=lambda r: r.started_mono)

    def _run_in_worker(self, fn: Callable[[], Any], timeout: float) -> Any:
        done = threading.Event()
        box: list = []
        self._commands.put((fn, done, box))
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError("process kubelet did not run the request in time")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    # -- node, lease ------------------------------------------------------------

    def _node_status(self) -> dict:
        ts = now_rfc3339()

        def cond(t: str, status: str, reason: str, msg: str) -> dict:
            return {
                "type": t,
                "status": status,
                "reason": reason,
                "message": msg,
                "lastHeartbeatTime": ts,
                "lastTransitionTime": self._boot_time,
            }

        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                cond(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "process kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {
                "machineID": self._machine_id,
                "systemUUID": self._machine_id,
                "bootID": self._boot_id,
                "kernelVersion": platform.release(),
                "osImage": "amlfs process kubelet",
                "containerRuntimeVersion": "process://1",
                "kubeletVersion": self._kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": _go_arch(),
            },
        }

    def _register_node(self) -> None:
        self._boot_time = now_rfc3339()
        self._boot_id = str(uuid.uuid4())
        self._machine_id = uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name).hex
        try:
            self._kubelet_version = self.rest.get("/version").get("gitVersion", "v0.0.0")
        except ApiError:
            self._kubelet_version = "v0.0.0"
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": _go_arch(),
            "amlfs.dev/process-kubelet": "true",
            **self.labels,
        }
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.rest.request("POST", "/api/v1/nodes", body=node)
        except ApiError as e:
            if e.status != 409:
                raise
            self.rest.merge_patch(f"/api/v1/nodes/{self.node_name}", {"metadata": {"labels": labels}})
        self._patch_node_status()

    def _patch_node_status(self) -> None:
        self.rest.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()})

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": now_micro(),
        }
        try:
            self.rest.merge_patch(path, {"spec": spec})
        except ApiError as e:
            if e.status != 404:
                raise
            node = self.rest.get(f"/api/v1/nodes/{self.node_name}")
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.node_name,
                    "namespace": "kube-node-lease",
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Node",
                            "name": self.node_name,
                            "uid": node["metadata"]["uid"],
                        }
                    ],
                },
                "spec": spec,
            }
            self.rest.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body=lease)

    def _heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(min(10.0, self.lease_seconds / 4)):
            try:
                self._renew_lease()
                if time.monotonic() - last_status > 30:
                    self._patch_node_status()
                    last_status = time.monotonic()
            except Exception as e:  # keep beating; the apiserver may be restarting
                log.warning("heartbeat failed: %s", e)

    # -- informer -------------------------------------------------------------------

    def _informer_loop(self) -> None:
        rv = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    lst = self.rest.get("/api/v1/pods")
                    with self._cache_lock:
                        self._cache = {p["metadata"]["uid"]: p for p in lst.get("items", [])}
                    rv = lst["metadata"]["resourceVersion"]
                    self.synced.set()
                    self._wake.set()
                resp = self.rest.request(
                    "GET",
                    "/api/v1/pods",
                    stream=True,
                    timeout=None,
                    query={
                        "watch": "true",
                        "resourceVersion": rv,
                        "allowWatchBookmarks": "true",
                        "timeoutSeconds": "20",
                    },
                )
                self._watch_resp = resp
                try:
                    for line in _iter_lines(resp):
                        evt = json.loads(line)
                        typ, obj = evt.get("type"), evt.get("object", {})
                        if typ == "ERROR":
                            rv = None  # e.g. 410 Gone: relist
                            break
                        rv = obj.get("metadata", {}).get("resourceVersion", rv)
                        if typ == "BOOKMARK":
                            continue
                        uid = obj["metadata"]["uid"]
                        with self._cache_lock:
                            if typ == "DELETED":
                                self._cache.pop(uid, None)
                            else:
                                self._cache[uid] = obj
                        self._wake.set()
                finally:
                    self._watch_resp = None
                    resp.release_conn()
            except Exception as e:
                if self._stop.is_set():
                    return
                log.warning("pod watch failed (%s); relisting", e)
                rv = None
                time.sleep(0.5)

    # -- worker -----------------------------------------------------------------------

    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
            while True:
                try:
                    fn, done, box = self._commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    box.append(fn())
                except BaseException as e:  # handed back to the caller
                    box.append(e)
                done.set()
            try:
                self._sync_all()
            except Exception:
                log.exception("process kubelet sync failed")
                time.sleep(0.5)

    def _sync_all(self) -> None:
        with self._cache_lock:
            pods = dict(self._cache)
        if self.bind_pods:
            for pod in pods.values():
                if (
                    not pod["spec"].get("nodeName")
                    and pod["status"].get("phase", "Pending") == "Pending"
                    and not pod["metadata"].get("deletionTimestamp")
                ):
                    self._maybe_bind(pod, pods)
        for uid, pod in pods.items():
            if pod["spec"].get("nodeName") != self.node_name or uid in self._runtimes:
                continue
            if pod["status"].get("phase") in TERMINAL:
                continue
            if pod["metadata"].get("deletionTimestamp"):
                # Never started here: nothing to stop; delete it once.
                if uid not in self._deleted:
                    self._deleted.add(uid)
                    self._delete_now(pod)
                continue
            self._admit(pod)
        for uid, rt in list(self._runtimes.items()):
            if rt.removed:
                continue
            pod = pods.get(uid)
            if pod is None:
                # Gone from the API (force-deleted, or our own final delete).
                self._kill_all(rt, grace=0)
                for c in rt.all_containers():
                    if c.state == "running":
                        self._finish_container(c, default_code=137)
                rt.finished = True
                rt.removed = True
                self._release(rt)
                continue
            rt.pod = pod
            try:
                self._sync_runtime(rt)
            except ApiError as e:
                if e.status == 404:
                    continue
                log.warning("sync of %s failed: %s", rt.key, e)

    # -- binding (only without kube-scheduler) ----------------------------------------

    def _maybe_bind(self, pod: dict, pods: dict[str, dict]) -> None:
        uid = pod["metadata"]["uid"]
        if pod["spec"].get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        if time.monotonic() < self._bind_attempts.get(uid, 0):
            return
        self._bind_attempts[uid] = time.monotonic() + 1.0
        used: dict[str, float] = {}
        count = 0
        for p in pods.values():
            if p["spec"].get("nodeName") == self.node_name and p["status"].get("phase") not in TERMINAL:
                count += 1
                for k, v in _pod_requests(p).items():
                    used[k] = used.get(k, 0) + v
        req = _pod_requests(pod)
        short = [k for k, v in req.items() if used.get(k, 0) + v > parse_quantity(self.capacity.get(k, "0"))]
        if count + 1 > int(self.capacity["pods"]):
            short.append("pods")
        if short:
            return  # stays Pending; retried every second like a scheduler would
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.rest.request("POST", f"/api/v1/namespaces/{ns}/pods/{name}/binding", body=binding)
        except ApiError as e:
            log.info("binding %s/%s failed: %s", ns, name, e)

    # -- pod admission and setup ------------------------------------------------------

    def _admit(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        pdir = self.workdir / "pods" / f"{ns}_{name}_{uid[:8]}"
        pdir.mkdir(parents=True, exist_ok=True)

        def mk(c: dict, init: bool) -> Container:
            logdir = pdir / "logs" / c["name"]
            logdir.mkdir(parents=True, exist_ok=True)
            return Container(
                name=c["name"], spec=c, init=init, logdir=logdir, term_file=pdir / "termination" / c["name"]
            )

        (pdir / "termination").mkdir(exist_ok=True)
        rt = PodRuntime(
            uid=uid,
            namespace=ns,
            name=name,
            pod=pod,
            dir=pdir,
            init_containers=[mk(c, True) for c in spec.get("initContainers", [])],
            containers=[mk(c, False) for c in spec.get("containers", [])],
            start_time=now_rfc3339(),
            started_mono=time.monotonic(),
        )
        self._runtimes[uid] = rt
        # Device "allocation": nvidia.com/gpu indices, exclusive per pod.
        want = int(_pod_requests(pod).get(GPU_RESOURCE, 0))
        if want:
            taken = {i for r in self._runtimes.values() if not r.finished for i in r.gpus}
            free = [i for i in range(self.gpu_count) if i not in taken]
            if len(free) < want:
                for c in rt.all_containers():
                    c.reason = ""
                self._finish_pod(
                    rt,
                    "Failed",
                    reason="UnexpectedAdmissionError",
                    message=f"Allocate failed due to requested number of devices unavailable for "
                    f"{GPU_RESOURCE}. Requested: {want}, Available: {len(free)}",
                )
                self._write_status(rt)
                return
            rt.gpus = free[:want]
        self._write_status(rt)

    def _prepare_volumes(self, rt: PodRuntime) -> None:
        """Write every pod volume into ``<pod dir>/volumes/<name>``: emptyDir,
        configMap, secret, downwardAPI, projected (serviceAccountToken via the
        TokenRequest API, configMap, secret, downwardAPI), hostPath (used in
        place). Raises ConfigError for missing objects and unsupported types."""
        for v in rt.pod["spec"].get("volumes", []) or []:
            name = v["name"]
            if "hostPath" in v:
                rt.volumes[name] = Path(v["hostPath"]["path"])
                continue
            d = rt.dir / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            rt.volumes[name] = d
            if "emptyDir" in v:
                continue
            if "configMap" in v:
                files = self._configmap_files(rt, v["configMap"])
                ro = True
            elif "secret" in v:
                files = self._secret_files(rt, {**v["secret"], "name": v["secret"].get("secretName")})
                ro = True
            elif "downwardAPI" in v:
                files = self._downward_files(rt, v["downwardAPI"])
                ro = True
            elif "projected" in v:
                files = {}
                for src in v["projected"].get("sources") or []:
                    if "serviceAccountToken" in src:
                        sat = src["serviceAccountToken"]
                        files[sat["path"]] = self._request_token(rt, sat).encode()
                        rt.sa_volume = name
                        rt.sa_token_source = sat
                    elif "configMap" in src:
                        files.update(self._configmap_files(rt, src["configMap"]))
                    elif "secret" in src:
                        files.update(self._secret_files(rt, src["secret"]))
                    elif "downwardAPI" in src:
                        files.update(self._downward_files(rt, src["downwardAPI"]))
                    else:
                        raise ConfigError(f"volume {name}: unsupported projected source {sorted(src)}")
                ro = True
            else:
                kinds = sorted(k for k in v if k != "name")
                raise ConfigError(f"volume {name}: volume type {kinds} is not supported by the process kubelet")
            for rel, data in files.items():
                target = d / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write_bytes(target, data)
            if ro:
                rt.read_only.add(name)
        if rt.sa_volume is not None:
            self._write_pod_kubeconfig(rt)

    @staticmethod
    def _select_items(data: dict[str, bytes], items: list[dict] | None) -> dict[str, bytes]:
        if not items:
            return dict(data)
        out = {}
        for it in items:
            if it["key"] not in data:
                raise ConfigError(f"couldn't find key {it['key']}")
            out[it.get("path", it["key"])] = data[it["key"]]
        return out

    def _configmap_files(self, rt: PodRuntime, ref: dict) -> dict[str, bytes]:
        cm = self.rest.get_or_none(f"/api/v1/namespaces/{rt.namespace}/configmaps/{ref['name']}")
        if cm is None:
            if ref.get("optional"):
                return {}
            raise ConfigError(f'configmap "{ref["name"]}" not found')
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return self._select_items(data, ref.get("items"))

    def _secret_files(self, rt: PodRuntime, ref: dict) -> dict[str, bytes]:
        sec = self.rest.get_or_none(f"/api/v1/namespaces/{rt.namespace}/secrets/{ref['name']}")
        if sec is None:
            if ref.get("optional"):
                return {}
            raise ConfigError(f'secret "{ref["name"]}" not found')
        data = {k: base64.b64decode(v) for k, v in (sec.get("data") or {}).items()}
        return self._select_items(data, ref.get("items"))

    def _downward_files(self, rt: PodRuntime, spec: dict) -> dict[str, bytes]:
        out = {}
        for it in spec.get("items") or []:
            if "fieldRef" in it:
                out[it["path"]] = self._field_ref(rt, it["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in it:
                ref = it["resourceFieldRef"]
                c = next((x for x in rt.all_containers() if x.name == ref.get("containerName")), rt.containers[0])
                out[it["path"]] = self._resource_field_ref(rt, c, ref).encode()
        return out

    def _request_token(self, rt: PodRuntime, sat: dict) -> str:
        """A pod-bound token for the pod's ServiceAccount (TokenRequest API),
        refreshed at 80% of its lifetime like the kubelet's token manager."""
        sa = rt.pod["spec"].get("serviceAccountName") or "default"
        exp = int(sat.get("expirationSeconds", 3607))
        spec: dict[str, Any] = {
            "expirationSeconds": exp,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": rt.name, "uid": rt.uid},
        }
        if sat.get("audience"):
            spec["audiences"] = [sat["audience"]]
        tr = self.rest.request(
            "POST",
            f"/api/v1/namespaces/{rt.namespace}/serviceaccounts/{sa}/token",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        rt.sa_refresh_at = time.monotonic() + 0.8 * exp
        return tr["status"]["token"]

    def _refresh_token(self, rt: PodRuntime) -> None:
        sat = rt.sa_token_source
        token = self._request_token(rt, sat)
        _atomic_write_bytes(rt.volumes[rt.sa_volume] / sat["path"], token.encode())

    def _write_pod_kubeconfig(self, rt: PodRuntime) -> None:
        """A kubeconfig acting as the pod's ServiceAccount (tokenFile), for
        in-pod clients when mount namespaces are not available."""
        d = rt.volumes[rt.sa_volume]
        sa = rt.pod["spec"].get("serviceAccountName") or "default"
        user = f"system:serviceaccount:{rt.namespace}:{sa}"
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "in-cluster",
                    "cluster": {
                        "server": f"https://{self.apiserver_host}:{self.apiserver_port}",
                        "certificate-authority": str(d / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": user, "user": {"tokenFile": str(d / "token")}}],
            "contexts": [
                {
                    "name": "in-cluster",
                    "context": {"cluster": "in-cluster", "namespace": rt.namespace, "user": user},
                }
            ],
            "current-context": "in-cluster",
        }
        _atomic_write_bytes(rt.dir / "sa-kubeconfig", json.dumps(kubeconfig, indent=2).encode())

    def _container_mounts(self, rt: PodRuntime, c: Container) -> list[tuple[Path, str, bool]]:
        """(host source, mountPath, read-only) for c's volumeMounts."""
        out = []
        for m in c.spec.get("volumeMounts") or []:
            src = rt.volumes.get(m["name"])
            if src is None:
                raise ConfigError(f"volumeMount {m['name']}: no such volume")
            if m.get("subPath"):
                src = src / m["subPath"]
                if not src.exists():
                    src.mkdir(parents=True)
            ro = bool(m.get("readOnly")) or m["name"] in rt.read_only
            out.append((src, m["mountPath"], ro))
        return out

    def _keep_visible(self) -> list[Path]:
        """Host directories pods must see whatever they mount: the Python environment and base
        interpreter, this checkout (editable installs import from it) and the kubelet's own pod dirs."""
        paths = {
            Path(sys.prefix).resolve(),
            Path(sys.base_prefix).resolve(),
            Path(__file__).resolve().parents[2],
            self.workdir.resolve(),
        }
        # outermost first, and no path inside another kept one
        out: list[Path] = []
        for p in sorted(paths, key=lambda p: len(p.parts)):
            if p.is_dir() and not any(_is_within(p, o) for o in out):
                out.append(p)
        return out

    def _mount_wrapper(self, c: Container, mounts: list[tuple[Path, str, bool]], argv: list[str]) -> list[str]:
        """argv run in a private mount namespace (``unshare --mount``; needs
        root) with the volumes bind-mounted at their mountPath and the
        termination-message file at ``IN_POD_TERMINATION_LOG`` (on a private
        tmpfs) and at ``terminationMessagePath`` when that path exists on the
        host (it is never created there: host programs may test for
        /dev/termination-log). Sources are opened before anything is mounted
        and bound through /proc/self/fd, so a volume mounted over /tmp cannot
        hide the others. Missing mount points are created (on the host, when
        not inside another volume) and left there."""
        q = shlex.quote
        lines = ["set -e"]
        ordered = sorted(mounts, key=lambda m: len(Path(m[1]).parts))  # parents first
        fds = {}
        for i, (src, _dst, _ro) in enumerate(ordered):
            fds[i] = 10 + i
            lines.append(f"exec {fds[i]}<{q(str(src))}")
        term_fd = 10 + len(ordered)
        lines.append(f"exec {term_fd}<>{q(str(c.term_file))}")
        # Host paths the pod's programs live in (the venv, the checkout, the pod dirs) stay visible even when a
        # volume is mounted over one of their ancestors (an emptyDir at /tmp with the checkout under /tmp).
        keep = [k for k in self._keep_visible() if any(_is_within(k, Path(dst)) for _s, dst, _ro in ordered)]
        keep_fds = {k: term_fd + 1 + j for j, k in enumerate(keep)}
        for k, fd in keep_fds.items():
            lines.append(f"exec {fd}<{q(str(k))}")
        for i, (src, dst, ro) in enumerate(ordered):
            if src.is_dir():
                lines.append(f"[ -e {q(dst)} ] || mkdir -p {q(dst)}")
            else:
                lines.append(f"[ -e {q(dst)} ] || {{ mkdir -p {q(str(Path(dst).parent))}; : > {q(dst)}; }}")
            lines.append(f"mount --no-canonicalize --bind /proc/self/fd/{fds[i]} {q(dst)}")
            if ro:
                lines.append(f"mount -o remount,bind,ro {q(dst)}")
        for k, fd in keep_fds.items():
            lines.append(f"mkdir -p {q(str(k))}")
            lines.append(f"mount --no-canonicalize --bind /proc/self/fd/{fd} {q(str(k))}")
        term_dir = str(Path(IN_POD_TERMINATION_LOG).parent)
        lines += [
            f"mkdir -p {q(term_dir)}",
            f"mount -t tmpfs -o size=1m,mode=0755 amlfs-pod {q(term_dir)}",
            f": > {q(IN_POD_TERMINATION_LOG)}",
            f"mount --no-canonicalize --bind /proc/self/fd/{term_fd} {q(IN_POD_TERMINATION_LOG)}",
        ]
        term_path = c.spec.get("terminationMessagePath") or "/dev/termination-log"
        lines.append(
            f"if [ -f {q(term_path)} ]; then mount --no-canonicalize --bind /proc/self/fd/{term_fd} {q(term_path)}; fi"
        )
        lines += [f"exec {fd}<&-" for fd in [*fds.values(), term_fd, *keep_fds.values()]]
        lines.append('exec "$@"')
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/bash",
            "-c",
            "\n".join(lines),
            "amlfs-pod",
            *argv,
        ]

    # -- container processes -----------------------------------------------------------

    def _base_env(self, rt: PodRuntime, c: Container) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",) and not k.startswith("AMLFS_K8S_")}
        venv_bin = str(Path(sys.prefix) / "bin")
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
            parts = env.get("PATH", "").split(os.pathsep)
            if venv_bin not in parts:
                env["PATH"] = os.pathsep.join([venv_bin, *[p for p in parts if p]])
        env["HOSTNAME"] = rt.name
        env["KUBERNETES_SERVICE_HOST"] = self.apiserver_host
        env["KUBERNETES_SERVICE_PORT"] = str(self.apiserver_port)
        env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(self.apiserver_port)
        env["AMLFS_POD_DIR"] = str(rt.dir)  # host path (hidden in the pod if it mounts over it)
        mounts = c.spec.get("volumeMounts") or []
        sa_mount = next((m for m in mounts if rt.sa_volume is not None and m["name"] == rt.sa_volume), None)
        if self.mount_namespaces:
            env["AMLFS_TERMINATION_LOG"] = IN_POD_TERMINATION_LOG
            if sa_mount is not None:
                env["AMLFS_SA_DIR"] = sa_mount["mountPath"]
        else:
            env["AMLFS_TERMINATION_LOG"] = str(c.term_file)
            if sa_mount is not None:
                env["AMLFS_SA_DIR"] = str(rt.volumes[rt.sa_volume])
                # No real mount at /var/run/secrets/...: in-cluster loaders
                # fail there, and clients fall back to this kubeconfig.
                env["KUBECONFIG"] = str(rt.dir / "sa-kubeconfig")
            vols = {
                m["mountPath"]: str(rt.volumes[m["name"]] / m.get("subPath", ""))
                for m in mounts
                if m["name"] in rt.volumes
            }
            if vols:
                env["AMLFS_POD_VOLUMES"] = json.dumps(vols)
        if rt.gpus:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(str(i) for i in rt.gpus)
        env.update(self.extra_env)
        return env

    def _container_env(self, rt: PodRuntime, c: Container) -> dict[str, str]:
        """The container's own env (envFrom, then env), resolved; raises
        ConfigError while a referenced object or key is missing."""
        ns = rt.namespace
        cache: dict[tuple[str, str], dict | None] = {}

        def obj(kind: str, name: str) -> dict | None:
            if (kind, name) not in cache:
                cache[(kind, name)] = self.rest.get_or_none(f"/api/v1/namespaces/{ns}/{kind}/{name}")
            return cache[(kind, name)]

        out: dict[str, str] = {}
        for ef in c.spec.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            if "configMapRef" in ef:
                ref = ef["configMapRef"]
                o = obj("configmaps", ref["name"])
                if o is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'configmap "{ref["name"]}" not found')
                for k, v in (o.get("data") or {}).items():
                    out[prefix + k] = v
            elif "secretRef" in ef:
                ref = ef["secretRef"]
                o = obj("secrets", ref["name"])
                if o is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'secret "{ref["name"]}" not found')
                for k, v in (o.get("data") or {}).items():
                    out[prefix + k] = base64.b64decode(v).decode(errors="replace")
        for e in c.spec.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                out[name] = expand(e.get("value", ""), out)
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf or "configMapKeyRef" in vf:
                secret = "secretKeyRef" in vf
                ref = vf["secretKeyRef" if secret else "configMapKeyRef"]
                kind = "secrets" if secret else "configmaps"
                o = obj(kind, ref["name"])
                data = (o or {}).get("data") or {}
                if o is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = "secret" if secret else "configmap"
                    if o is None:
                        raise ConfigError(f'{what} "{ref["name"]}" not found')
                    raise ConfigError(f"couldn't find key {ref['key']} in {what} {ns}/{ref['name']}")
                val = data[ref["key"]]
                out[name] = base64.b64decode(val).decode(errors="replace") if secret else val
            elif "fieldRef" in vf:
                out[name] = self._field_ref(rt, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                out[name] = self._resource_field_ref(rt, c, vf["resourceFieldRef"])
        return out

    def _field_ref(self, rt: PodRuntime, path: str) -> str:
        meta, spec = rt.pod["metadata"], rt.pod["spec"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.hostIP": "127.0.0.1",
            "status.podIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        for prefix, src in (
            ("metadata.labels", meta.get("labels") or {}),
            ("metadata.annotations", meta.get("annotations") or {}),
        ):
            if path.startswith(prefix + "['") and path.endswith("']"):
                return src.get(path[len(prefix) + 2 : -2], "")
            if path == prefix:
                return "\n".join(f'{k}="{v}"' for k, v in sorted(src.items()))
        raise ConfigError(f"unsupported fieldRef {path}")

    def _resource_field_ref(self, rt: PodRuntime, c: Container, ref: dict) -> str:
        import math

        target = c
        if ref.get("containerName"):
            target = next((x for x in rt.all_containers() if x.name == ref["containerName"]), c)
        kind, _, res = ref["resource"].partition(".")
        val = ((target.spec.get("resources") or {}).get(kind) or {}).get(res)
        if val is None:  # unset limit: node allocatable, like the kubelet
            val = self.capacity.get(res, "0")
        divisor = parse_quantity(ref.get("divisor", "1"))
        return str(math.ceil(parse_quantity(val) / divisor))

    def _argv(self, c: Container, env: dict[str, str]) -> list[str]:
        spec = c.spec
        command = [expand(x, env) for x in spec.get("command") or []]
        args = [expand(x, env) for x in spec.get("args") or []]
        if not command:
            image = spec.get("image", "")
            entry = self.image_commands.get(image)
            if entry is None:
                base = image.split("@", 1)[0]
                if ":" in base.rsplit("/", 1)[-1]:
                    base = base.rsplit(":", 1)[0]
                entry = self.image_commands.get(base)
            if entry is None:
                raise ConfigError(
                    f'container has no command and image "{image}" has no entry in the '
                    f"process kubelet's image_commands"
                )
            command = list(entry)
        return command + args

    def _start_container(self, rt: PodRuntime, c: Container) -> None:
        try:
            if not rt.prepared:
                self._prepare_volumes(rt)
                rt.prepared = True
            cenv = self._container_env(rt, c)
            env = self._base_env(rt, c)
            lookup = dict(cenv)
            env.update(cenv)
            argv = self._argv(c, lookup)
            cwd = c.spec.get("workingDir") or str(rt.dir / "work" / c.name)
            if shutil.which(argv[0], path=env.get("PATH")) is None and not os.path.isfile(os.path.join(cwd, argv[0])):
                start_error = f'exec: "{argv[0]}": executable file not found in $PATH'
            else:
                start_error = None
            if self.mount_namespaces and start_error is None:
                argv = self._mount_wrapper(c, self._container_mounts(rt, c), argv)
        except ConfigError as e:
            c.state, c.reason, c.message = "waiting", "CreateContainerConfigError", str(e)
            c.next_start = time.monotonic() + 1.0
            return
        except ApiError as e:
            c.state, c.reason, c.message = "waiting", "CreateContainerConfigError", str(e)
            c.next_start = time.monotonic() + 1.0
            return
        Path(cwd).mkdir(parents=True, exist_ok=True)
        c.term_file.write_text("")
        c.instances += 1
        c.started_at = now_rfc3339()
        c.popen = None
        if start_error is None:
            logfile = open(c.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
            try:
                # setpriv --pdeathsig: the process dies with the worker thread
                # (i.e. with the kubelet), even if Python is SIGKILLed.
                c.popen = subprocess.Popen(
                    [*self._pdeathsig, *argv],
                    env=env,
                    cwd=cwd,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as e:
                start_error = f"failed to start {argv[0]}: {e}"
            finally:
                logfile.close()
        if start_error is not None:
            c.state, c.exit_code, c.reason = "terminated", 128, "StartError"
            c.message = start_error
            c.finished_at = now_rfc3339()
            c.ever_ran = True
            c.log_path.write_text(start_error + "\n")
            return
        c.state, c.reason, c.message, c.exit_code = "running", "", "", None
        c.finished_at = None
        c.ever_ran = True
        log.info("started %s/%s pid %s: %s", rt.key, c.name, c.popen.pid, argv)

    def _finish_container(self, c: Container, default_code: int | None = None) -> None:
        """Record the exit of c's process (which must have ended)."""
        code = c.popen.poll() if c.popen is not None else None
        if code is None:
            code = default_code if default_code is not None else 137
        elif code < 0:
            code = 128 - code  # killed by signal N -> 128+N, like a container runtime
        if c.forced_exit is not None:
            code, c.forced_exit = c.forced_exit, None
        c.exit_code = code
        c.finished_at = now_rfc3339()
        c.state = "terminated"
        if c.forced_reason:
            c.reason, c.forced_reason = c.forced_reason, None
        else:
            c.reason = "Completed" if code == 0 else "Error"
        msg = ""
        with contextlib.suppress(OSError):
            msg = c.term_file.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        if not msg and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                tail = c.log_path.read_bytes()[-2048:].decode(errors="replace").splitlines()[-80:]
                msg = "\n".join(tail)
        c.message = msg

    def _kill_all(self, rt: PodRuntime, grace: float) -> None:
        running = [c for c in rt.all_containers() if c.popen is not None and c.popen.poll() is None]
        if not running:
            return
        sig = signal.SIGKILL if grace <= 0 else signal.SIGTERM
        for c in running:
            _signal_group(c.popen, sig)
        deadline = time.monotonic() + max(grace, 0) + 5
        for c in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.popen.wait(timeout=max(0.05, deadline - time.monotonic()))
            _signal_group(c.popen, signal.SIGKILL)

    def _restart_delay(self, c: Container) -> float:
        first, cap = self.restart_backoff
        return min(cap, first * (2 ** max(c.restart_count - 1, 0)))

    # -- the pod state machine ----------------------------------------------------------

    def _sync_runtime(self, rt: PodRuntime) -> None:
        pod = rt.pod
        meta, spec = pod["metadata"], pod["spec"]
        policy = spec.get("restartPolicy", "Always")
        now = time.monotonic()

        if rt.finished and not meta.get("deletionTimestamp"):
            return

        # Deletion: SIGTERM, grace period, SIGKILL, final status, delete(grace 0).
        if meta.get("deletionTimestamp"):
            if not rt.terminating:
                rt.terminating = True
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = spec.get("terminationGracePeriodSeconds", 30)
                rt.kill_at = now + float(grace)
                for c in rt.all_containers():
                    if c.popen is not None and c.popen.poll() is None:
                        _signal_group(c.popen, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            alive = [c for c in rt.all_containers() if c.popen is not None and c.popen.poll() is None]
            if alive and now < rt.kill_at:
                return
            for c in alive:
                _signal_group(c.popen, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.popen.wait(timeout=5)
            if not rt.finished:
                for c in rt.all_containers():
                    if c.state == "running":
                        self._finish_container(c)
                    elif c.state == "waiting":
                        c.reason, c.message = "", ""
                codes = [c.exit_code for c in rt.containers if c.exit_code is not None]
                ok = bool(codes) and all(x == 0 for x in codes) and len(codes) == len(rt.containers)
                self._finish_pod(rt, "Succeeded" if ok else "Failed")
                with contextlib.suppress(ApiError):
                    self._write_status(rt)
            if not rt.removed:
                self._delete_now(pod)
                rt.removed = True
            return

        # activeDeadlineSeconds
        ads = spec.get("activeDeadlineSeconds")
        if ads is not None and time.time() - parse_time(rt.start_time) >= float(ads):
            self._kill_all(rt, grace=0)
            for c in rt.all_containers():
                if c.state == "running":
                    self._finish_container(c)
                    c.reason = "Error"
                elif c.state == "waiting":
                    c.reason, c.message = "", ""
            self._finish_pod(
                rt,
                "Failed",
                reason="DeadlineExceeded",
                message="Pod was active on the node longer than the specified deadline",
            )
            self._write_status(rt)
            return

        # Service-account token refresh.
        if rt.sa_volume is not None and now >= rt.sa_refresh_at:
            with contextlib.suppress(ApiError):
                self._refresh_token(rt)

        # Reap exited processes.
        for c in rt.all_containers():
            if c.state == "running" and c.popen is not None and c.popen.poll() is not None:
                self._finish_container(c)

        # Init containers, in order.
        for c in rt.init_containers:
            if c.state == "terminated" and c.exit_code == 0:
                continue
            if c.state == "terminated":  # failed
                if policy == "Never":
                    self._finish_pod(rt, "Failed")
                    self._write_status(rt)
                    return
                self._schedule_restart(c, now)
            if c.state == "waiting" and now >= c.next_start:
                self._start_container(rt, c)
            self._set_phase(rt, "Pending")
            self._write_status(rt)
            return

        # Regular containers.
        for c in rt.containers:
            if c.state == "terminated":
                restart = policy == "Always" or (policy == "OnFailure" and c.exit_code != 0)
                if restart:
                    self._schedule_restart(c, now)
            if c.state == "waiting" and now >= c.next_start:
                self._start_container(rt, c)
                if c.state == "terminated":  # StartError: handled next tick
                    self._wake.set()

        states = [c.state for c in rt.containers]
        if all(s == "terminated" for s in states) and rt.containers:
            codes = [c.exit_code for c in rt.containers]
            self._finish_pod(rt, "Succeeded" if all(x == 0 for x in codes) else "Failed")
        elif any(s == "running" for s in states) or any(c.ever_ran for c in rt.containers):
            self._set_phase(rt, "Running")
        else:
            self._set_phase(rt, "Pending")
        self._write_status(rt)

    def _schedule_restart(self, c: Container, now: float) -> None:
        c.last_state = {"terminated": c.terminated_state()}
        c.restart_count += 1
        c.state = "waiting"
        c.reason = "CrashLoopBackOff"
        c.message = f"back-off restarting failed container {c.name}"
        c.next_start = now + self._restart_delay(c)
        c.exit_code = None

    def _set_phase(self, rt: PodRuntime, phase: str) -> None:
        rt.phase = phase

    def _finish_pod(self, rt: PodRuntime, phase: str, reason: str | None = None, message: str | None = None) -> None:
        rt.phase = phase
        if reason:
            rt.reason = reason
        if message:
            rt.message = message
        rt.finished = True
        self._release(rt)

    def _release(self, rt: PodRuntime) -> None:
        rt.gpus = []

    def _status(self, rt: PodRuntime) -> dict:
        ts = rt.start_time
        inits_done = all(c.state == "terminated" and c.exit_code == 0 for c in rt.init_containers)
        ready = rt.phase == "Running" and all(c.state == "running" for c in rt.containers)

        def cond(t: str, ok: bool, reason: str | None = None) -> dict:
            d = {
                "type": t,
                "status": "True" if ok else "False",
                "lastTransitionTime": ts,
                "lastProbeTime": None,
            }
            if reason and not ok:
                d["reason"] = reason
            return d

        not_ready_reason = "PodCompleted" if rt.phase in TERMINAL else "ContainersNotReady"
        conditions = [
            cond(
                "PodReadyToStartContainers",
                rt.phase not in TERMINAL or any(c.ever_ran for c in rt.all_containers()),
            ),
            cond(
                "Initialized",
                inits_done,
                "ContainersNotInitialized" if rt.phase not in TERMINAL else "PodCompleted",
            ),
            cond("Ready", ready, not_ready_reason),
            cond("ContainersReady", ready, not_ready_reason),
            cond("PodScheduled", True),
            *rt.extra_conditions,
        ]
        status: dict[str, Any] = {
            "phase": rt.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": ts,
            "containerStatuses": [c.status() for c in rt.containers],
            "reason": rt.reason,
            "message": rt.message,
        }
        if rt.init_containers:
            status["initContainerStatuses"] = [c.status() for c in rt.init_containers]
        return status

    def _write_status(self, rt: PodRuntime) -> None:
        if rt.removed:
            return
        status = self._status(rt)
        blob = json.dumps(status, sort_keys=True)
        if blob == rt.last_status:
            return
        # merge-patch replaces lists whole; precondition on uid.
        body = {"metadata": {"uid": rt.uid}, "status": status}
        self.rest.merge_patch(f"/api/v1/namespaces/{rt.namespace}/pods/{rt.name}/status", body)
        rt.last_status = blob

    def _delete_now(self, pod: dict) -> None:
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        try:
            self.rest.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body=body)
        except ApiError as e:
            if e.status not in (404, 409):
                raise

    # -- logs over HTTPS (for kubectl logs through the apiserver) -------------------------

    def _start_log_server(self) -> None:
        kubelet = self
        certdir = self.workdir / "pki"
        certdir.mkdir(exist_ok=True)
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "kubelet.key",
                "-out",
                "kubelet.crt",
                "-days",
                "3650",
                "-subj",
                f"/CN={self.node_name}",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            cwd=certdir,
            check=True,
            capture_output=True,
        )

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet
                log.debug("kubelet http: " + fmt, *args)

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                q = urllib.parse.parse_qs(url.query)
                parts = url.path.strip("/").split("/")
                if parts == ["healthz"]:
                    return self._send(200, b"ok")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    return self._send(404, b"not found")
                _, ns, name, cname = parts
                try:
                    rt = kubelet._runtime_by_name(ns, name)
                    c = next(x for x in rt.all_containers() if x.name == cname)
                except (KeyError, StopIteration):
                    return self._send(404, f"container {cname} of pod {ns}/{name} not found".encode())
                previous = q.get("previous", ["false"])[0] == "true"
                path = kubelet.log_path(ns, name, cname, previous=previous)
                data = path.read_bytes() if path.exists() else b""
                if "tailLines" in q:
                    n = int(q["tailLines"][0])
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-n:]) if n > 0 else b""
                if "limitBytes" in q:
                    data = data[: int(q["limitBytes"][0])]
                if q.get("follow", ["false"])[0] != "true" or previous:
                    return self._send(200, data)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                pos = path.stat().st_size if path.exists() else 0
                try:
                    self._chunk(data)
                    popen = c.popen
                    while not kubelet._stop.is_set():
                        more = b""
                        if path.exists():
                            with open(path, "rb") as fh:
                                fh.seek(pos)
                                more = fh.read()
                        pos += len(more)
                        if more:
                            self._chunk(more)
                        elif popen is None or popen.poll() is not None:
                            break
                        else:
                            time.sleep(0.2)
                    self._chunk(b"")
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

            def _chunk(self, b: bytes):
                self.wfile.write(f"{len(b):x}\r\n".encode() + b + b"\r\n")
                self.wfile.flush()

            def _send(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certdir / "kubelet.crt", certdir / "kubelet.key")
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.log_port = server.server_address[1]
        t = threading.Thread(target=server.serve_forever, name="kubelet-logs", daemon=True)
        t.start()


# --------------------------------------------------------------------------
# helpers


def _signal_group(popen: subprocess.Popen | None, sig: int) -> None:
    if popen is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _mount_namespaces_work() -> bool:
    """Can we give a pod a private mount namespace with bind mounts?"""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("mount"):
        return False
    probe = tempfile.mkdtemp(prefix="amlfs-mntprobe-")
    try:
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "mount", "--bind", probe, probe],
            capture_output=True,
            timeout=10,
        )
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.rmdir(probe)


def _go_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _pod_requests(pod: dict) -> dict[str, float]:
    """Effective requests: max(sum of containers, any init container), per
    resource; limits stand in for missing requests (as the API defaults)."""

    def reqs(c: dict) -> dict[str, float]:
        r = c.get("resources") or {}
        merged = {**(r.get("limits") or {}), **(r.get("requests") or {})}
        return {k: parse_quantity(v) for k, v in merged.items()}

    total: dict[str, float] = {}
    for c in pod["spec"].get("containers", []):
        for k, v in reqs(c).items():
            total[k] = total.get(k, 0) + v
    for c in pod["spec"].get("initContainers", []) or []:
        for k, v in reqs(c).items():
            total[k] = max(total.get(k, 0), v)
    return total


def _is_within(path: Path, ancestor: Path) -> bool:
    """path is ancestor or lies below it."""
    try:
        path.relative_to(ancestor)
        return True
    except ValueError:
        return False
