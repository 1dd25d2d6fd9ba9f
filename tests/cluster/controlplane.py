"""A real Kubernetes control plane for tests, run as local processes.

Starts, on 127.0.0.1 and free ports:

* etcd (``etcd-embed``: the etcd server library embedded in a tiny Go main),
* the stock ``kube-apiserver`` (TLS with a throw-away CA, static token
  authentication, RBAC authorization, service-account issuer + signing key),
* the stock ``kube-controller-manager`` (all default controllers: garbage
  collector, namespace, serviceaccount(-token), deployment, replicaset, job, ...
  using per-controller service-account credentials),
* optionally the stock ``kube-scheduler``,

writes an admin kubeconfig, waits until ``/readyz`` is ok and the controller
manager has done its first work, and tears every process group down again
(``stop()``, ``atexit``, a finalizer, and ``PR_SET_PDEATHSIG`` on Linux for a
parent that dies without cleanup).

Binaries come from ``tests/cluster/build.sh`` (built from the Go modules on
first use and cached outside the repository).  ``AMLFS_K8S_BINDIR`` points at
an existing directory of binaries instead.

Use as a library::

    with ControlPlane() as cp:
        print(cp.kubeconfig)

or as a command (``python tests/cluster/controlplane.py``), which prints the
``export KUBECONFIG=...`` line and runs until Ctrl-C.  ``tests/cluster/up``
starts the whole test stack (control plane + process kubelet + services).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"

#: Tokens the static token file knows; the kubelet gets its own identity.
ADMIN_USER = "amlfs-admin"
KUBELET_USER = "amlfs-kubelet"

SERVICE_CIDR = "10.0.0.0/24"
#: The first address of SERVICE_CIDR: the ``kubernetes`` Service's ClusterIP.
KUBERNETES_SERVICE_IP = "10.0.0.1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlaneError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# binaries


def ensure_binaries(build: bool = True) -> Path:
    """Return the directory with the control-plane binaries, building them
    with build.sh when needed (a warm cache returns at once)."""
    override = os.environ.get("AMLFS_K8S_BINDIR")
    if override:
        path = Path(override)
        missing = [
            b for b in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl") if not (path / b).exists()
        ]
        if missing:
            raise ControlPlaneError(f"AMLFS_K8S_BINDIR={path} lacks {missing}")
        return path
    if not build:
        out = subprocess.run([str(BUILD_SCRIPT), "--print-bindir"], check=True, capture_output=True, text=True)
        return Path(out.stdout.strip())
    # build.sh logs to stderr (left on the terminal/pytest capture) and prints
    # the bin dir as its last stdout line.
    proc = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"tests/cluster/build.sh failed with exit code {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel's pick; small race window)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(argv: list[str]) -> list[str]:
    """argv prefixed so that the process gets SIGKILL when the thread that
    started it dies (PR_SET_PDEATHSIG via util-linux ``setpriv``; it survives
    exec). Only from the main thread: the signal follows the starting
    *thread*, and a short-lived helper thread would take the child with it."""
    if threading.current_thread() is not threading.main_thread() or not shutil.which("setpriv"):
        return argv
    return ["setpriv", "--pdeathsig", "KILL", "--", *argv]


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # The leader may be gone while children of the group remain.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _run_openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(pki: Path, server_sans: list[str]) -> None:
    """A CA, an apiserver serving cert (signed by it) and the service-account
    signing key pair, with the openssl CLI."""
    pki.mkdir(parents=True, exist_ok=True)
    _run_openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=amlfs-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki,
    )
    _run_openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        "-subj",
        "/CN=kube-apiserver",
        cwd=pki,
    )
    san = ",".join(("IP:" if _is_ip(s) else "DNS:") + s for s in server_sans)
    (pki / "apiserver.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={san}\n"
    )
    _run_openssl(
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "apiserver.crt",
        "-days",
        "3650",
        "-extfile",
        "apiserver.ext",
        cwd=pki,
    )
    # Service-account token signing key (RS256, what every client expects).
    _run_openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=pki)
    _run_openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for key in ("ca.key", "apiserver.key", "sa.key"):
        os.chmod(pki / key, 0o600)


def _is_ip(s: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in s else socket.AF_INET, s)
        return True
    except OSError:
        return False


def write_kubeconfig(
    path: Path,
    server: str,
    ca_file: Path,
    user: str,
    token: str | None = None,
    token_file: Path | None = None,
    namespace: str = "default",
) -> Path:
    """A kubeconfig (JSON is valid YAML) for ``server`` with a bearer token."""
    user_entry: dict = {}
    if token is not None:
        user_entry["token"] = token
    if token_file is not None:
        user_entry["tokenFile"] = str(token_file)
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "amlfs-test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": user_entry}],
        "contexts": [
            {"name": "amlfs-test", "context": {"cluster": "amlfs-test", "user": user, "namespace": namespace}}
        ],
        "current-context": "amlfs-test",
    }
    path.write_text(json.dumps(cfg, indent=2))
    os.chmod(path, 0o600)
    return path


# --------------------------------------------------------------------------
# processes


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    argv: list[str]


_LIVE: weakref.WeakSet[ControlPlane] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for cp in list(_LIVE):
        with contextlib.suppress(Exception):
            cp.stop()


@dataclass(eq=False)
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager (+ kube-scheduler)."""

    workdir: Path | None = None
    bindir: Path | None = None
    scheduler: bool = True
    #: --controllers for kube-controller-manager ("*" = every default-on one).
    controllers: str = "*"
    extra_apiserver_args: list[str] = field(default_factory=list)
    #: an audit.k8s.io/v1 Policy: the API server logs the requests it selects to `audit_log` (JSON lines), so a
    #: test can count one client's requests, which the server's own metrics do not tell apart.
    audit_policy: dict | None = None
    ready_timeout: float = 90.0
    verbosity: int = 1

    # filled by start()
    api_port: int = 0
    server: str = ""
    admin_token: str = ""
    kubelet_token: str = ""
    kubeconfig: Path = Path()
    kubelet_kubeconfig: Path = Path()
    ca_file: Path = Path()
    startup_seconds: float = 0.0
    audit_log: Path | None = None

    def __post_init__(self) -> None:
        self._procs: list[_Proc] = []
        self._own_workdir = False
        self._stopped = False
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        t0 = time.monotonic()
        if self.bindir is None:
            self.bindir = ensure_binaries()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="amlfs-k8s-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir(exist_ok=True)
        pki = self.workdir / "pki"
        _LIVE.add(self)
        self._finalizer = weakref.finalize(self, ControlPlane._finalize, self._procs)
        t_bin = time.monotonic()
        try:
            make_pki(
                pki,
                [
                    "127.0.0.1",
                    "localhost",
                    KUBERNETES_SERVICE_IP,
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
            )
            self.ca_file = pki / "ca.crt"
            self._start_etcd()
            self._start_apiserver(pki)
            self._wait_apiserver_ready()
            self._start_controller_manager(pki)
            if self.scheduler:
                self._start_scheduler()
            self._wait_controllers_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t_bin
        self.total_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        # Reverse order: controllers first, etcd last.
        ControlPlane._finalize(self._procs)
        _LIVE.discard(self)
        if self._own_workdir and self.workdir and not os.environ.get("AMLFS_KEEP_CLUSTER_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _finalize(procs: list[_Proc]) -> None:
        for p in reversed(procs):
            _kill_group(p.popen, grace=5)
        procs.clear()

    def _spawn(self, name: str, argv: list[str], at: int | None = None) -> _Proc:
        log = self.logdir / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 - handed to the child, closed below
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
        try:
            popen = subprocess.Popen(
                die_with_parent(argv),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # own process group: killpg takes all
            )
        finally:
            fh.close()
        proc = _Proc(name, popen, log, argv)
        if at is None:
            self._procs.append(proc)
        else:  # a restart keeps the component's place: stop() goes in reverse start order
            self._procs[at] = proc
        return proc

    def _index(self, name: str) -> int:
        return next(i for i, p in enumerate(self._procs) if p.name == name)

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver (SIGTERM, as a rolling restart would); etcd and its data stay."""
        _kill_group(self._procs[self._index("kube-apiserver")].popen, grace=10)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again with the same arguments (same port, certificates and tokens) and wait
        until it is ready; the controllers, the kubelet and clients reconnect on their own."""
        i = self._index("kube-apiserver")
        if self._procs[i].popen.poll() is None:
            raise ControlPlaneError("kube-apiserver is running; stop_apiserver() first")
        self._spawn("kube-apiserver", self._procs[i].argv, at=i)
        self._wait_apiserver_ready()

    def _check_alive(self) -> None:
        for p in self._procs:
            rc = p.popen.poll()
            if rc is not None:
                raise ControlPlaneError(f"{p.name} exited with {rc}; last log lines:\n{self.tail_log(p.name)}")

    def tail_log(self, name: str, lines: int = 40) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # -- components --------------------------------------------------------

    def _start_etcd(self) -> None:
        self.etcd_port = free_port()
        peer_port = free_port()
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self._spawn(
            "etcd",
            [
                str(self.bindir / "etcd"),
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            ],
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(self.etcd_url + "/health", timeout=1) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise ControlPlaneError("etcd did not become healthy:\n" + self.tail_log("etcd"))

    def _start_apiserver(self, pki: Path) -> None:
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.admin_token = secrets.token_hex(16)
        self.kubelet_token = secrets.token_hex(16)
        self.kcm_token = secrets.token_hex(16)
        self.scheduler_token = secrets.token_hex(16)
        tokens = pki / "tokens.csv"
        # token,user,uid,"group1,group2"
        tokens.write_text(
            f'{self.admin_token},{ADMIN_USER},uid-admin,"system:masters"\n'
            f'{self.kubelet_token},{KUBELET_USER},uid-kubelet,"system:masters,system:nodes"\n'
            f"{self.kcm_token},system:kube-controller-manager,uid-kcm\n"
            f"{self.scheduler_token},system:kube-scheduler,uid-scheduler\n"
        )
        os.chmod(tokens, 0o600)
        self._spawn(
            "kube-apiserver",
            [
                str(self.bindir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # a loopback advertise address is refused by the endpoint
                # reconciler; pods reach the apiserver via KUBERNETES_SERVICE_HOST
                "--endpoint-reconciler-type=none",
                f"--secure-port={self.api_port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # pods/log, exec: the process kubelet's HTTPS endpoint on 127.0.0.1
                "--kubelet-preferred-address-types=InternalIP",
                # one local instance: no need for many watch caches/goroutines
                "--profiling=false",
                f"--v={self.verbosity}",
                *self._audit_args(),
                *self.extra_apiserver_args,
            ],
        )

    def _audit_args(self) -> list[str]:
        if self.audit_policy is None:
            return []
        assert self.workdir is not None
        policy = self.workdir / "audit-policy.json"
        policy.write_text(json.dumps(self.audit_policy))
        self.audit_log = self.workdir / "audit.log"
        # blocking: an event is in the file once the request is answered
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
        ]

    def audit_events(self) -> list[dict]:
        """The audit log's events so far (none without an `audit_policy`)."""
        if self.audit_log is None or not self.audit_log.exists():
            return []
        events = []
        for line in self.audit_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # the last line may be half-written
                events.append(json.loads(line))
        return events

    def _get(self, path: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(
            self.server + path, headers={"Authorization": f"Bearer {token or self.admin_token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_apiserver_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                code, body = self._get("/readyz")
                if code == 200:
                    break
                last = body.decode(errors="replace")
            except OSError as e:
                last = str(e)
            time.sleep(0.2)
        else:
            raise ControlPlaneError(
                f"kube-apiserver not ready after {self.ready_timeout}s: {last}\n" + self.tail_log("kube-apiserver")
            )
        self.kubeconfig = write_kubeconfig(
            self.workdir / "kubeconfig", self.server, self.ca_file, ADMIN_USER, token=self.admin_token
        )
        self.kubelet_kubeconfig = write_kubeconfig(
            self.workdir / "kubelet.kubeconfig",
            self.server,
            self.ca_file,
            KUBELET_USER,
            token=self.kubelet_token,
        )

    def _start_controller_manager(self, pki: Path) -> None:
        kcfg = write_kubeconfig(
            self.workdir / "kcm.kubeconfig",
            self.server,
            self.ca_file,
            "system:kube-controller-manager",
            token=self.kcm_token,
        )
        self.kcm_port = free_port()
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bindir / "kube-controller-manager"),
                f"--kubeconfig={kcfg}",
                f"--authentication-kubeconfig={kcfg}",
                f"--authorization-kubeconfig={kcfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.kcm_port}",
                "--leader-elect=false",
                f"--controllers={self.controllers}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # a test cluster: react fast
                "--concurrent-gc-syncs=5",
                "--node-monitor-grace-period=40s",
                "--profiling=false",
                f"--v={self.verbosity}",
            ],
        )

    def _start_scheduler(self) -> None:
        kcfg = write_kubeconfig(
            self.workdir / "scheduler.kubeconfig",
            self.server,
            self.ca_file,
            "system:kube-scheduler",
            token=self.scheduler_token,
        )
        self.scheduler_port = free_port()
        self._spawn(
            "kube-scheduler",
            [
                str(self.bindir / "kube-scheduler"),
                f"--kubeconfig={kcfg}",
                f"--authentication-kubeconfig={kcfg}",
                f"--authorization-kubeconfig={kcfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.scheduler_port}",
                "--leader-elect=false",
                "--profiling=false",
                f"--v={self.verbosity}",
            ],
        )

    def _wait_controllers_ready(self) -> None:
        """The controller manager is working once the serviceaccount controller
        has made the ``default`` ServiceAccount and the root-CA publisher the
        ``kube-root-ca.crt`` ConfigMap in the ``default`` namespace; the
        scheduler once its /healthz answers."""
        deadline = time.monotonic() + self.ready_timeout
        waiting = ["serviceaccount", "configmap"] + (["scheduler"] if self.scheduler else [])
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError):
                if (
                    "serviceaccount" in waiting
                    and self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
                ):
                    waiting.remove("serviceaccount")
                if (
                    "configmap" in waiting
                    and self._get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt")[0] == 200
                ):
                    waiting.remove("configmap")
                if "scheduler" in waiting and self._component_healthy(self.scheduler_port):
                    waiting.remove("scheduler")
            if not waiting:
                return
            time.sleep(0.2)
        raise ControlPlaneError(
            f"controllers not ready after {self.ready_timeout}s (waiting for {waiting}):\n"
            + self.tail_log("kube-controller-manager")
        )

    @staticmethod
    def _component_healthy(port: int) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=1, context=ctx) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    # -- conveniences -------------------------------------------------------

    @property
    def kubectl_path(self) -> Path:
        return self.bindir / "kubectl"

    @property
    def helm_path(self) -> Path:
        return self.bindir / "helm"

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def pids(self) -> list[int]:
        return [p.popen.pid for p in self._procs if p.popen.poll() is None]

    def env(self) -> dict[str, str]:
        """Environment for a shell or subprocess that should use this cluster."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        }


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run the local Kubernetes control plane until Ctrl-C.")
    ap.add_argument("--workdir", type=Path, help="state dir (default: a fresh temp dir, removed on exit)")
    ap.add_argument("--no-scheduler", action="store_true", help="do not run kube-scheduler")
    args = ap.parse_args(argv)
    cp = ControlPlane(workdir=args.workdir, scheduler=not args.no_scheduler)
    cp.start()
    print(f"# control plane ready in {cp.startup_seconds:.1f}s (logs: {cp.logdir})", flush=True)
    print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
    print(f"export PATH={cp.bindir}:$PATH", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1):
            cp._check_alive()
    finally:
        cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
