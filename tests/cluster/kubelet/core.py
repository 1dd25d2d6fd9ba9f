"""ProcessKubelet itself: configuration, start/stop, the worker thread that runs every state change (so pod state
needs no locks), its reconcile of the informer's cache against the running pods, and the read-only test API
(``log_path``, ``logs``, ``pod_dir``, ``pids``). The other concerns are mixins, one module each."""

from __future__ import annotations

import contextlib
import http.server
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .binding import BindingMixin
from .common import GPU_RESOURCE, TERMINAL, log
from .containers import ContainersMixin, _signal_group
from .env import EnvMixin
from .informer import InformerMixin
from .lifecycle import LifecycleMixin
from .logserver import LogServerMixin
from .mounts import MountsMixin, _mount_namespaces_work
from .node import NodeMixin
from .rest import ApiError, Rest
from .runtime import PodRuntime
from .volumes import VolumesMixin


class ProcessKubelet(
    NodeMixin,
    InformerMixin,
    BindingMixin,
    LifecycleMixin,
    ContainersMixin,
    VolumesMixin,
    MountsMixin,
    EnvMixin,
    LogServerMixin,
):
    """Runs the pods bound to one Node as local processes (see the package docstring for what a pod gets)."""

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
