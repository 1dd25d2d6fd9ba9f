"""The operator at scale on the test control plane: N concurrent searches x B samples x E epochs, with trainer pods
that only report (tests/support/fake_trainer.py: a one-line shell per pod and one helper in this process, so the
machine spends its time on the operator, not on the fakes).

  python benchmarks/operator_scale.py --searches 1 12 50 --samples 4 --epochs 5

Each N runs in a fresh namespace with a fresh operator process (`amlfs-operator`, as its own ServiceAccount, so
that the API server's audit log tells its requests apart). The fake trainers' helper and the process kubelets
(several nodes: one kubelet reports its pods' status one at a time) run as processes of their own, so that this
one only watches and measures. Printed per N:

* searches finished (Succeeded) out of N;
* epoch overhead: from the last reward of an epoch being pushed to all B pods of the next epoch existing in the
  API server, p50 and p99 over all searches and epochs: as this process's watch sees them, and as the API
  server's audit log times its answers to their creation (free of the watch's lag under load); and the first
  from the last pod of the epoch being Succeeded in the API server (once the kubelet's reporting is taken out);
* the operator's peak RSS, CPU seconds per search-epoch, and API requests per search-epoch (from the audit log),
  all measured from the first search applied to the last one finished and its pods deleted (the cleanup of the
  finishing passes runs in the background).

Targets at N=50, B=4: all succeed, p50 <= 1 s, p99 <= 2 s, RSS <= 300 MB, CPU and requests per search-epoch flat
from N=1 to N=50.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from amlfs.controller.metrics import HANDOFF_STAGES  # noqa: E402
from tests.cluster.controlplane import ControlPlane, write_kubeconfig  # noqa: E402
from tests.cluster.kubelet import ProcessKubelet  # noqa: E402
from tests.cluster.services import Pushgateway  # noqa: E402
from tests.support.fake_trainer import pod_template, read_record  # noqa: E402
from tests.support.s3 import S3Server, free_port  # noqa: E402

OPERATOR_NS = "amlfs-system"
OPERATOR_SA = "amlfs-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],  # one line per request, when it completes
    "rules": [{"level": "Metadata", "users": [OPERATOR_USER]}, {"level": "None"}],
}


POD_NAME = re.compile(r"^(?P<search>.+)-e(?P<epoch>\d+)-[sp]\d+(-a\d+)?(-r\d+)?$")  # controller.pods.pod_name


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class PodTimes:
    """When each pod was first seen and when it was first seen Succeeded, from a watch of the namespace."""

    def __init__(self, core: Any, namespace: str) -> None:
        from kubernetes import watch

        self.added: dict[tuple[str, int], list[float]] = collections.defaultdict(list)  # (search, epoch)
        self.succeeded: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
        self._done: set[str] = set()
        self._w = watch.Watch()
        self._ready = threading.Event()
        threading.Thread(target=self._run, args=(core, namespace), daemon=True).start()
        self._ready.wait(10)

    def _run(self, core: Any, namespace: str) -> None:
        try:
            self._ready.set()
            for ev in self._w.stream(core.list_namespaced_pod, namespace, timeout_seconds=3600):
                now = time.time()
                pod = ev["object"]
                labels = pod.metadata.labels or {}
                if "amlfs.io/search" not in labels:
                    continue
                key = (labels["amlfs.io/search"], int(labels.get("amlfs.io/epoch", "-1")))
                if ev["type"] == "ADDED":
                    self.added[key].append(now)
                if pod.status and pod.status.phase == "Succeeded" and pod.metadata.uid not in self._done:
                    self._done.add(pod.metadata.uid)
                    self.succeeded[key].append(now)
        except Exception:  # the API server goes away at the end
            pass

    def stop(self) -> None:
        self._w.stop()


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """A quantile of a Prometheus histogram from its cumulative buckets (le -> count), interpolated within the
    bucket as histogram_quantile() does."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return float("nan")
    rank, lo, below = q * buckets[bounds[-1]], 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (rank - below) / max(buckets[le] - below, 1e-12)
        lo, below = le, buckets[le]
    return lo


def handoff_stages(text: str) -> dict[str, dict[str, float]]:
    """The operator's amlfs_operator_epoch_handoff_seconds by stage: mean, p50 and p99 (from the buckets)."""
    name = "amlfs_operator_epoch_handoff_seconds"
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = collections.defaultdict(dict)
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        labels = dict(kv.split("=", 1) for kv in head.partition("{")[2].rstrip("}").split(","))
        stage = labels.get("stage", "").strip('"')
        if head.startswith(f"{name}_sum"):
            sums[stage] = float(value)
        elif head.startswith(f"{name}_count"):
            counts[stage] = float(value)
        elif head.startswith(f"{name}_bucket"):
            buckets[stage][float(labels["le"].strip('"'))] = float(value)
    return {
        stage: {
            "count": counts[stage],
            "mean_s": sums.get(stage, 0.0) / max(1.0, counts[stage]),
            "p50_s": bucket_quantile(buckets[stage], 0.5),
            "p99_s": bucket_quantile(buckets[stage], 0.99),
        }
        for stage in counts
    }


def iso_seconds(ts: str) -> float:
    """An audit log timestamp (RFC 3339 with microseconds) as Unix time."""
    import datetime as dt

    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def proc_cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU seconds of a process (utime + stime), with its reaped children's when asked."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11 : 15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def process_kind(pid: int) -> str:
    """What a process of the harness is, for the CPU breakdown."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    cmd = " ".join(a.decode(errors="replace") for a in argv)
    for needle, kind in (
        ("amlfs.controller.main", "operator"),
        ("--run-kubelet", "kubelets (and their pods)"),
        ("fake_trainer", "fake trainers' helper"),
        ("kube-apiserver", "kube-apiserver"),
        ("kube-controller-manager", "controller manager"),
        ("kube-scheduler", "scheduler"),
        ("pushgateway", "pushgateway"),
        ("etcd", "etcd"),
        ("weed", "S3 (SeaweedFS)"),
        ("operator_scale.py", "this benchmark"),
    ):
        if needle in cmd:
            return kind
    return "other"


def cpu_by_kind() -> tuple[dict[str, float], float]:
    """CPU seconds so far of every process by kind (with their reaped children: a kubelet's pods), and of the
    whole machine (busy time of all cores)."""
    out: dict[str, float] = collections.defaultdict(float)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            out[process_kind(int(d.name))] += proc_cpu_seconds(int(d.name), children=True)
        except OSError:  # gone meanwhile
            continue
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return dict(out), (sum(cpu) - cpu[3] - cpu[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    def __init__(self, base: Path, args: argparse.Namespace) -> None:
        self.base, self.args = base, args

    def __enter__(self) -> Bench:
        base = self.base
        base.mkdir(parents=True, exist_ok=True)
        self.s3 = S3Server(base / "s3").start()
        self.cp = ControlPlane(workdir=base / "cp", audit_policy=AUDIT_POLICY).start()
        assert self.cp.audit_log is not None
        self.audit_log = self.cp.audit_log
        self.children: list[subprocess.Popen[bytes]] = []
        env = dict(os.environ, **self.s3.env())
        for i in range(self.args.nodes):
            self.children.append(
                self.spawn(
                    "kubelet",
                    i,
                    [
                        __file__,
                        "--run-kubelet",
                        f"node-{i}",
                        str(base / f"kubelet-{i}"),
                        str(self.cp.kubelet_kubeconfig),
                        str(self.cp.ca_file),
                    ],
                    env,
                )
            )
        self.pushgateway = Pushgateway(workdir=base / "pushgateway").start()
        url_file, self.pushes = base / "fakes.url", base / "pushes.jsonl"
        self.children.append(
            self.spawn(
                "fakes",
                0,
                ["-m", "tests.support.fake_trainer", "--url-file", str(url_file), "--record", str(self.pushes)],
                env,
            )
        )
        deadline = time.monotonic() + 60
        while not url_file.exists() or not self.nodes_ready():
            if time.monotonic() > deadline or any(c.poll() is not None for c in self.children):
                raise SystemExit(f"fake trainers or kubelets did not start; logs in {base}")
            time.sleep(0.2)
        self.fakes_url = url_file.read_text()
        self.kubectl("apply", "-f", str(REPO / "crds" / "losssearch.yaml"))
        for attempt in range(10):  # right after the apply, the CRD may have no conditions yet to wait on
            try:
                self.kubectl("wait", "--for=condition=Established", "crd/losssearches.amlfs.io", "--timeout=60s")
                break
            except SystemExit:
                if attempt == 9:
                    raise
                time.sleep(0.5)
        self.kubectl("create", "namespace", OPERATOR_NS)
        self.kubectl("create", "serviceaccount", OPERATOR_SA, "-n", OPERATOR_NS)
        self.kubectl(
            "create",
            "clusterrolebinding",
            "amlfs-operator-bench",
            "--clusterrole=cluster-admin",
            f"--serviceaccount={OPERATOR_NS}:{OPERATOR_SA}",
        )
        token = self.kubectl("create", "token", OPERATOR_SA, "-n", OPERATOR_NS, "--duration=24h").strip()
        self.op_kubeconfig = write_kubeconfig(
            base / "operator.kubeconfig", self.cp.server, self.cp.ca_file, OPERATOR_SA, token=token
        )
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.cp.kubeconfig), client_configuration=cfg)
        self.api = client.ApiClient(cfg)
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        for thing in (self.pushgateway, self.cp, self.s3):
            try:
                thing.stop()
            except Exception as e:  # keep tearing down the rest
                print(f"# stop failed: {e}", file=sys.stderr)

    def spawn(self, what: str, i: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.base / f"{what}-{i}.log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )

    def nodes_ready(self) -> bool:
        out = subprocess.run(
            [str(self.cp.kubectl_path), f"--kubeconfig={self.cp.kubeconfig}", "get", "nodes", "-o", "name"],
            capture_output=True,
            text=True,
            check=False,
        )
        return len(out.stdout.split()) >= self.args.nodes

    def kubectl(self, *args: str, input: str | None = None) -> str:
        out = subprocess.run(
            [str(self.cp.kubectl_path), f"--kubeconfig={self.cp.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise SystemExit(f"kubectl {' '.join(args)}: {out.stderr}")
        return out.stdout

    def search_doc(self, namespace: str, name: str) -> dict[str, Any]:
        a = self.args
        return {
            "apiVersion": "amlfs.io/v1alpha1",
            "kind": "LossSearch",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "search": {"epochs": a.epochs, "samplesPerEpoch": a.samples},
                "storage": {"uri": f"s3://{self.s3.bucket}/bench", "endpoint": self.s3.endpoint},
                "trainer": {
                    "image": "amlfs-fake-trainer",
                    "metricsPort": 0,
                    "resources": {"gpu": 0, "cpu": "1m", "memory": "1Mi"},
                    "podTemplate": pod_template(self.fakes_url, sleep=a.sleep),
                },
            },
        }

    def run(self, n: int) -> dict[str, Any]:
        from kubernetes import client

        a = self.args
        namespace = f"scale-{n}-{int(time.time())}"
        self.kubectl("create", "namespace", namespace)
        core = client.CoreV1Api(self.api)
        custom = client.CustomObjectsApi(self.api)
        times = PodTimes(core, namespace)
        metrics_port, health_port = free_port(), free_port()
        env = dict(os.environ, KUBECONFIG=str(self.op_kubeconfig), **self.s3.env())
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO / "operator"), str(REPO / "trainer_image"), env.get("PYTHONPATH", "")]
        )
        log = open(self.base / f"operator-{n}.log", "wb")  # noqa: SIM115 (closed below)
        op = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amlfs.controller.main",
                "--namespace",
                namespace,
                "--pushgateway",
                self.pushgateway.url,
                "--metrics-port",
                str(metrics_port),
                "--health-port",
                str(health_port),
                "--interval",
                str(a.interval),
                *(["--workers", str(a.workers)] if a.workers else []),
                *(["--reward-poll", str(a.reward_poll)] if a.reward_poll is not None else []),
                *(["--settle", str(a.settle)] if a.settle is not None else []),
                *(["--progress", str(a.progress)] if a.progress is not None else []),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2).close()
                    break
                except OSError:
                    if op.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(
                            f"operator did not start:\n{(self.base / f'operator-{n}.log').read_text()}"
                        ) from None
                    time.sleep(0.2)
            time.sleep(2)  # the initial lists and watches
            audit_start = self.audit_log.stat().st_size
            cpu0, t0 = proc_cpu_seconds(op.pid), time.time()
            kinds0, busy0 = cpu_by_kind()
            names = [f"s{i:03d}" for i in range(n)]
            docs = "---\n".join(yaml.safe_dump(self.search_doc(namespace, name)) for name in names)
            self.kubectl("apply", "-f", "-", input=docs)
            phases: dict[str, str] = {}
            epochs_done = 0
            limit = time.monotonic() + a.timeout
            while time.monotonic() < limit:
                items = custom.list_namespaced_custom_object("amlfs.io", "v1alpha1", namespace, "losssearches")["items"]
                phases = {o["metadata"]["name"]: (o.get("status") or {}).get("phase", "") for o in items}
                epochs_done = sum(int((o.get("status") or {}).get("epoch", 0)) for o in items)
                if len(phases) == n and all(p in ("Succeeded", "Failed") for p in phases.values()):
                    break
                time.sleep(1)
            wall = time.time() - t0
            # the finishing passes delete their pods and post their events in the background: let them land, so
            # that the requests and CPU counted are all of the searches' (at most 30 s)
            settled = time.monotonic() + 30
            while time.monotonic() < settled:
                pods = core.list_namespaced_pod(namespace).items
                if not any(p.metadata.deletion_timestamp is None for p in pods):
                    break
                time.sleep(0.5)
            time.sleep(2)
            cpu = proc_cpu_seconds(op.pid) - cpu0
            kinds1, busy1 = cpu_by_kind()
            rss = proc_peak_rss_mb(op.pid)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
                op_metrics = resp.read().decode()
            with open(self.audit_log, "rb") as fh:
                fh.seek(audit_start)
                lines = fh.read().decode(errors="replace").splitlines()
        finally:
            op.terminate()
            try:
                op.wait(timeout=30)
            except subprocess.TimeoutExpired:
                op.kill()
            log.close()
            times.stop()
        requests: collections.Counter[str] = collections.Counter()
        status_writers: collections.Counter[str] = collections.Counter()  # status writes by client (user agent)
        latency: dict[str, list[float]] = collections.defaultdict(list)  # the API server's own, by request kind
        created: dict[tuple[str, int], list[float]] = collections.defaultdict(list)  # (search, epoch): pods made
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("user", {}).get("username") != OPERATOR_USER:
                continue
            ref = ev.get("objectRef", {})
            what = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            requests[f"{ev.get('verb')} {what}"] += 1
            if what == "losssearches/status" and ev.get("verb") == "patch":  # the reconciler's, or kopf's own
                status_writers[(ev.get("userAgent") or "?").split("/")[0]] += 1
            made = POD_NAME.match(ref.get("name", "")) if what == "pods" and ev.get("verb") == "create" else None
            if made and ev.get("responseStatus", {}).get("code") in (200, 201) and ev.get("stageTimestamp"):
                created[(made["search"], int(made["epoch"]))].append(iso_seconds(ev["stageTimestamp"]))
            if ev.get("verb") != "watch" and ev.get("requestReceivedTimestamp") and ev.get("stageTimestamp"):
                latency[f"{ev.get('verb')} {what}"].append(
                    iso_seconds(ev["stageTimestamp"]) - iso_seconds(ev["requestReceivedTimestamp"])
                )
        overhead, from_succeeded, to_created = [], [], []
        pushes = read_record(self.pushes)
        for name in names:
            for e in range(1, a.epochs):
                pushed = [pushes.get((namespace, name, e - 1, s)) for s in range(a.samples)]
                added = times.added.get((name, e), [])
                succ = times.succeeded.get((name, e - 1), [])
                if None in pushed or len(added) < a.samples:
                    continue
                last = max(p for p in pushed if p is not None)
                overhead.append(sorted(added)[a.samples - 1] - last)
                if len(made := created.get((name, e), [])) >= a.samples:
                    to_created.append(sorted(made)[a.samples - 1] - last)
                if len(succ) >= a.samples:
                    from_succeeded.append(sorted(added)[a.samples - 1] - max(succ))
        search_epochs = max(1, epochs_done)
        passes: dict[str, float] = {}
        causes: dict[str, float] = {}  # passes by what made them due
        metrics = (
            "amlfs_operator_reconcile_duration_seconds_",
            "amlfs_operator_pass_wait_seconds_",
            "amlfs_operator_pushgateway_read_seconds_",
        )
        for line in op_metrics.splitlines():
            if line.startswith('amlfs_operator_passes_total{cause="'):
                cause, _, value = line.removeprefix('amlfs_operator_passes_total{cause="').partition('"} ')
                causes[cause] = float(value)
            for metric in metrics:
                if line.startswith(metric):
                    head, _, value = line.rpartition(" ")
                    passes[head.replace("amlfs_operator_", "")] = float(value)
        self.kubectl("delete", "namespace", namespace, "--wait=false")
        return {
            "searches": n,
            "samples": a.samples,
            "epochs": a.epochs,
            "succeeded": sum(1 for p in phases.values() if p == "Succeeded"),
            "wall_s": wall,
            "search_epochs": epochs_done,
            "overhead_p50_s": percentile(overhead, 50),
            # the same to the API server's answer to the last creation (its audit log): without this process's
            # watch, which lags behind under load
            "to_created_p50_s": percentile(to_created, 50),
            "to_created_p99_s": percentile(to_created, 99),
            "overhead_p99_s": percentile(overhead, 99),
            "overhead_max_s": max(overhead, default=float("nan")),
            "from_succeeded_p50_s": percentile(from_succeeded, 50),
            "from_succeeded_p99_s": percentile(from_succeeded, 99),
            "operator_peak_rss_mb": rss,
            "operator_cpu_s": cpu,
            "cpu_s_per_search_epoch": cpu / search_epochs,
            "requests": sum(requests.values()),
            "requests_per_search_epoch": sum(requests.values()) / search_epochs,
            "requests_by_kind": dict(requests.most_common()),
            "status_writes_by_client": dict(status_writers.most_common()),
            "server_latency_ms": {
                k: {"p50": percentile(v, 50) * 1e3, "p99": percentile(v, 99) * 1e3} for k, v in latency.items()
            },
            "passes": passes.get("reconcile_duration_seconds_count", 0.0),
            "pass_mean_s": passes.get("reconcile_duration_seconds_sum", 0.0)
            / max(1.0, passes.get("reconcile_duration_seconds_count", 0.0)),
            "pass_wait_mean_s": passes.get("pass_wait_seconds_sum", 0.0)
            / max(1.0, passes.get("pass_wait_seconds_count", 0.0)),
            "pushgateway_reads": passes.get("pushgateway_read_seconds_count", 0.0),
            "pushgateway_read_mean_s": passes.get("pushgateway_read_seconds_sum", 0.0)
            / max(1.0, passes.get("pushgateway_read_seconds_count", 0.0)),
            "pass_histograms": passes,
            "pass_causes": causes,
            "handoff": handoff_stages(op_metrics),
            "machine_busy": (busy1 - busy0) / (wall * (os.cpu_count() or 1)),
            "cpu_share": dict(
                sorted(
                    ((k, (v - kinds0.get(k, 0.0)) / max(busy1 - busy0, 1e-9)) for k, v in kinds1.items() if k),
                    key=lambda kv: -kv[1],
                )
            ),
        }

    def pod_watch_uris(self) -> list[str]:
        """How the operator asked for pods (evidence of the server-side label selector)."""
        out = []
        for ev in self.cp.audit_events():
            if ev.get("objectRef", {}).get("resource") == "pods" and ev.get("verb") in ("list", "watch"):
                out.append(f"{ev['verb']} {ev['requestURI']}")
        return sorted(set(out))


def run_kubelet(node: str, workdir: str, kubeconfig: str, ca_file: str) -> None:
    """One node, as a process of its own (`--run-kubelet`), until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kubelet = ProcessKubelet(
        kubeconfig, node_name=node, workdir=workdir, cpu="1000", memory="1000Gi", pods=5000, ca_file=ca_file
    ).start()
    try:
        stop.wait()
    finally:
        kubelet.stop()


def main() -> None:
    if sys.argv[1:2] == ["--run-kubelet"]:
        run_kubelet(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--searches", type=int, nargs="+", default=[1, 12], help="N values, one run each")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds each fake trainer sleeps")
    ap.add_argument("--interval", type=float, default=5.0, help="the operator's AMLFS_INTERVAL")
    ap.add_argument("--workers", type=int, default=0, help="the operator's AMLFS_WORKERS (default: its own)")
    ap.add_argument("--reward-poll", type=float, help="the operator's AMLFS_REWARD_POLL (default: its own)")
    ap.add_argument("--settle", type=float, help="the operator's AMLFS_SETTLE (default: its own)")
    ap.add_argument("--progress", type=float, help="the operator's AMLFS_PROGRESS (default: its own)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for one N to finish")
    ap.add_argument("--nodes", type=int, default=8, help="process kubelets (nodes) running the fake pods")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temporary directory)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="amlfs-scale-") as tmp, Bench(args.workdir or Path(tmp), args) as bench:
        for n in args.searches:
            r = bench.run(n)
            results.append(r)
            print(
                f"N={n:3d} B={r['samples']} E={r['epochs']}: {r['succeeded']}/{n} succeeded in {r['wall_s']:.0f}s; "
                f"overhead p50 {r['overhead_p50_s']:.2f}s p99 {r['overhead_p99_s']:.2f}s "
                f"(to the pods' creation in the audit log: p50 {r['to_created_p50_s']:.2f}s "
                f"p99 {r['to_created_p99_s']:.2f}s; "
                f"from Succeeded: p50 {r['from_succeeded_p50_s']:.2f}s p99 {r['from_succeeded_p99_s']:.2f}s); "
                f"operator peak RSS {r['operator_peak_rss_mb']:.0f} MB, "
                f"{r['cpu_s_per_search_epoch']:.3f} CPU-s and {r['requests_per_search_epoch']:.1f} API requests "
                f"per search-epoch",
                flush=True,
            )
            print("   requests:", ", ".join(f"{k} {v}" for k, v in r["requests_by_kind"].items()), flush=True)
            print(
                "   API server latency p50/p99 ms:",
                ", ".join(f"{k} {v['p50']:.0f}/{v['p99']:.0f}" for k, v in r["server_latency_ms"].items()),
                flush=True,
            )
            print(
                f"   passes: {r['passes']:.0f}, mean {r['pass_mean_s'] * 1e3:.0f} ms, "
                f"mean wait for a worker {r['pass_wait_mean_s'] * 1e3:.0f} ms; "
                f"{r['pushgateway_reads']:.0f} Pushgateway reads, mean {r['pushgateway_read_mean_s'] * 1e3:.0f} ms; "
                "by cause: "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["pass_causes"].items(), key=lambda kv: -kv[1])),
                flush=True,
            )
            order = ("total", "detect", *HANDOFF_STAGES)
            print(
                "   handoff as the operator saw it (push of the last result -> next epoch's pods), mean/p50/p99 ms: "
                + ", ".join(
                    f"{k} {h['mean_s'] * 1e3:.0f}/{h['p50_s'] * 1e3:.0f}/{h['p99_s'] * 1e3:.0f}"
                    for k in order
                    if (h := r["handoff"].get(k))
                ),
                flush=True,
            )
            print(
                f"   machine {r['machine_busy'] * 100:.0f} % busy; its busy CPU by process: "
                + ", ".join(f"{k} {v * 100:.0f} %" for k, v in r["cpu_share"].items() if v >= 0.005),
                flush=True,
            )
        print("pod list/watch requests of the operator:", *bench.pod_watch_uris(), sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
