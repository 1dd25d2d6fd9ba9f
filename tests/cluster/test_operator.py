"""The kopf operator end to end on the real control plane: real trainer processes (process kubelet, or containers
of the CPU trainer image on an external cluster), real S3 (SeaweedFS), real Pushgateway and Prometheus. No mocks.
The operator runs here as a process, with the cluster's admin kubeconfig."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.support.s3 import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits-k8s.yaml"


@pytest.fixture(scope="module")
def crd(cluster):
    cluster.kubectl("apply", "-f", str(REPO / "crds" / "losssearch.yaml"))
    cluster.wait_crd("losssearches.amlfs.io")
    return "losssearches.amlfs.io"


class Operator:
    """The operator as a real process (`amlfs-operator`), restartable and killable."""

    def __init__(self, cluster, namespace: str, monitoring, s3, logdir: Path, group_ttl: float = 3) -> None:
        self.cluster, self.namespace, self.logdir = cluster, namespace, logdir
        self.env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), **s3.env())
        self.args = [
            sys.executable,
            "-m",
            "amlfs.controller.main",
            "--namespace",
            namespace,
            "--pushgateway",
            monitoring.pushgateway.url,  # where this process reads rewards
            "--pod-pushgateway",
            monitoring.pushgateway.pod_url,  # where the trainer pods push them
            "--interval",
            "2",
            "--reward-timeout",
            "20",
            "--group-ttl",
            str(group_ttl),  # 3 s by default: the tests' Prometheus scrapes every second
            "--health-port",
            "0",
        ]
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Operator:
        self.starts += 1
        self.metrics_port = free_port()
        with open(self.logdir / f"operator-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [*self.args, "--metrics-port", str(self.metrics_port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def finish(self) -> None:
        """Delete the namespace's searches while the operator still runs, then stop it: stopped first, its
        finalizer would keep them, and the namespace, Terminating (the namespace controller then lists its pods
        over and over)."""
        self.cluster.kubectl(
            "delete", "losssearch", "--all", "-n", self.namespace, "--wait=true", "--timeout=60s", check=False
        )
        self.stop()

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logdir.glob("operator-*.log")))


class PodWatch:
    """Records every pod ADDED in a namespace (name -> set of uids) from a real watch."""

    def __init__(self, cluster, namespace: str) -> None:
        from kubernetes import client, watch

        self.added: dict[str, set[str]] = {}
        self._w = watch.Watch()
        api = client.CoreV1Api(cluster.api_client)
        self._t = threading.Thread(target=self._run, args=(api, namespace), daemon=True)
        self._t.start()

    def _run(self, api, namespace: str) -> None:
        try:
            for ev in self._w.stream(api.list_namespaced_pod, namespace, timeout_seconds=900):
                if ev["type"] == "ADDED":
                    self.added.setdefault(ev["object"].metadata.name, set()).add(ev["object"].metadata.uid)
        except Exception:  # the namespace went away
            pass

    def stop(self) -> None:
        self._w.stop()


def setup_namespace(cluster, namespace: str, s3) -> None:
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "amlfs-s3",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )


def manifest(s3, name: str = "digits-k8s", **search) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["storage"]["uri"] = f"s3://{s3.bucket}/searches"
    doc["spec"]["storage"]["endpoint"] = s3.pod_endpoint  # the trainer pods' view; the operator's: AWS_* env
    doc["spec"]["trainer"]["resources"]["gpu"] = 0  # the test nodes have no GPU (a GPU pod would fail at once)
    doc["spec"]["search"].update(search)
    return doc


def apply(cluster, namespace: str, doc: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def get(cluster, namespace: str, name: str) -> dict:
    return cluster.kubectl_json("get", "losssearch", name, "-n", namespace)


def wait_phase(
    cluster, namespace: str, name: str, phases=("Succeeded", "Failed"), timeout: float = 600, op: Operator | None = None
) -> dict:
    deadline = time.monotonic() + timeout
    obj = {}
    while time.monotonic() < deadline:
        obj = get(cluster, namespace, name)
        if (obj.get("status") or {}).get("phase") in phases:
            return obj
        time.sleep(1)
    raise AssertionError(f"{name} not in {phases} after {timeout}s: {obj.get('status')}\n{op.log() if op else ''}")


def stored(s3, obj: dict, path: str) -> bytes:
    """An object below the search's storage root (status.storageRoot: <storage.uri>/<namespace>/<name>/<uid>)."""
    root = obj["status"]["storageRoot"]
    assert root.startswith(f"s3://{s3.bucket}/searches/") and root.endswith(obj["metadata"]["uid"]), root
    key = f"{root.removeprefix(f's3://{s3.bucket}/')}/{path}"
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def history(s3, obj: dict) -> list[dict]:
    return [json.loads(line) for line in stored(s3, obj, "history.jsonl").decode().splitlines()]


def wait_pod_exists(cluster, namespace: str, pod: str, phases: tuple[str, ...], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while cluster.kubectl("get", "pod", pod, "-n", namespace, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {pod} never created")
        time.sleep(0.3)
    cluster.wait_pod(namespace, pod, phases=phases, timeout=timeout)


def search_pods(cluster, namespace: str, name: str) -> list[str]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"amlfs.io/search={name}", "-o", "name")
    return out.stdout.split()


@pytest.fixture(scope="module")
def reference(cluster, crd, monitoring, s3_server, tmp_path_factory):
    """One uninterrupted search: the full-search test checks it; the crash test compares against it."""
    from uuid import uuid4

    ns = f"ref-{uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    setup_namespace(cluster, ns, s3_server)
    op = Operator(cluster, ns, monitoring, s3_server, tmp_path_factory.mktemp("op-ref")).start()
    watch = PodWatch(cluster, ns)
    try:
        doc = manifest(s3_server)
        t0 = time.monotonic()
        apply(cluster, ns, doc)
        obj = wait_phase(cluster, ns, doc["metadata"]["name"], op=op)
        elapsed = time.monotonic() - t0
        time.sleep(3)  # let the operator's last pass delete the pods
        yield {"ns": ns, "obj": obj, "doc": doc, "op": op, "watch": watch, "elapsed": elapsed}
    finally:
        watch.stop()
        op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_full_search_from_kubectl_apply(cluster, reference, s3_server, monitoring):
    ns, obj, name = reference["ns"], reference["obj"], reference["doc"]["metadata"]["name"]
    st = obj["status"]
    assert st["phase"] == "Succeeded", (st.get("message"), reference["op"].log())
    assert st["epoch"] == 3 and len(st["history"]) == 3
    assert any(abs(m) > 1e-6 for m in st["mu"]), "mu must have moved"
    assert {c["type"]: c["status"] for c in st["conditions"]} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
    }
    # the best checkpoint exists in S3 with the recorded digest
    import hashlib

    key = st["best"]["checkpoint"].removeprefix(f"s3://{s3_server.bucket}/")
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == st["best"]["sha256"]
    final = json.loads(stored(s3_server, obj, "final/mu.json"))
    assert final["mu"] == st["mu"]
    hist = history(s3_server, obj)
    assert [h["epoch"] for h in hist] == [0, 1, 2] and all(len(h["rewards"]) == 3 for h in hist)
    assert all(r is not None for h in hist for r in h["rewards"])
    # every sample ran as its own pod, none twice; all cleaned up afterwards
    added = reference["watch"].added
    assert sorted(added) == sorted(f"{name}-e{e}-s{s}" for e in range(3) for s in range(3))
    assert all(len(uids) == 1 for uids in added.values())
    assert search_pods(cluster, ns, name) == []
    # events
    events = cluster.kubectl_json("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
    reasons = [e["reason"] for e in events["items"]]
    assert sorted(reasons) == sorted(
        ["EpochStarted", "EpochCompleted", "EpochCompleted", "EpochCompleted", "SearchSucceeded"]
    )
    told = {e["message"] for e in events["items"] if e["reason"] == "EpochCompleted"}
    # one event per epoch: its close, its promotion and the next epoch's start
    assert sum("promoted to" in m and m.endswith("started: 3 samples") for m in told) == 2, told

    # rewards went through the Pushgateway and its groups were removed once collected
    def ours() -> list[dict]:
        url = f"{monitoring.pushgateway.url}/api/v1/metrics"
        data = json.load(__import__("urllib.request").request.urlopen(url))["data"]
        return [g for g in data if g["labels"].get("search") == name and g["labels"].get("namespace") == ns]

    deadline = time.monotonic() + 30  # kept for the group TTL (3 s here) after their epoch closed
    while ours() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ours()
    # printer columns
    out = cluster.kubectl("get", "losssearch", name, "-n", ns).stdout
    assert "Succeeded" in out and "3" in out
    # `amlfs report` from the storage root alone (no cluster access) says what the status says
    cli = [sys.executable, "-c", "import sys; from amlfs.cli import main; sys.exit(main())"]
    env = dict(os.environ, **s3_server.env())
    rep = subprocess.run([*cli, "report", "--json", st["storageRoot"]], env=env, capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    got = json.loads(rep.stdout)
    assert got["phase"] == "Succeeded" and got["epochs"] == 3 and got["plannedEpochs"] == 3
    assert got["best"]["reward"] == st["best"]["reward"] and got["best"]["checkpoint"] == st["best"]["checkpoint"]
    assert got["mu"] == st["mu"] and [h["bestReward"] for h in got["history"]] == [h["bestReward"] for h in hist]


def test_operator_killed_at_random_points_reaches_the_same_result(
    cluster, reference, monitoring, s3_server, namespace, tmp_path
):
    setup_namespace(cluster, namespace, s3_server)
    doc = reference["doc"]
    name = doc["metadata"]["name"]
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path)
    watch = PodWatch(cluster, namespace)
    rng = random.Random(1234)
    try:
        apply(cluster, namespace, doc)
        kills = 0
        deadline = time.monotonic() + 600
        while kills < 5 and time.monotonic() < deadline:
            op.start()
            time.sleep(rng.uniform(1.0, 8.0))
            op.kill()
            kills += 1
            phase = (get(cluster, namespace, name).get("status") or {}).get("phase")
            if phase == "Succeeded":
                break
        op.start()
        obj = wait_phase(cluster, namespace, name, op=op)
        time.sleep(3)
    finally:
        watch.stop()
        op.stop()
    assert kills >= 3, "the search finished before the operator was killed enough times"
    ref = reference["obj"]["status"]
    st = obj["status"]
    assert st["phase"] == "Succeeded", op.log()
    assert st["mu"] == ref["mu"]
    h_ref = history(s3_server, reference["obj"])
    h = history(s3_server, obj)
    assert [x["thetas"] for x in h] == [x["thetas"] for x in h_ref]
    assert [x["sha256"] for x in h] == [x["sha256"] for x in h_ref]
    assert st["best"]["sha256"] == ref["best"]["sha256"]
    assert all(len(uids) == 1 for uids in watch.added.values()), watch.added
    assert search_pods(cluster, namespace, name) == []


def test_failed_sample_is_retried_config_error_is_not(cluster, crd, monitoring, s3_server, namespace, tmp_path):
    setup_namespace(cluster, namespace, s3_server)
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    try:
        doc = manifest(s3_server, name="retry", epochs=1, samplesPerEpoch=2)
        apply(cluster, namespace, doc)
        wait_pod_exists(cluster, namespace, "retry-e0-s1", ("Running",))
        cluster.crash_trainer(namespace, "retry-e0-s1")
        obj = wait_phase(cluster, namespace, "retry", op=op)
        assert obj["status"]["phase"] == "Succeeded", op.log()
        h = history(s3_server, obj)
        assert h[0]["states"] == ["Succeeded", "Succeeded"]
        events = cluster.kubectl_json("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=retry")
        assert "SampleRetried" in [e["reason"] for e in events["items"]]

        bad = manifest(s3_server, name="bad-data", epochs=1, samplesPerEpoch=2)
        bad["spec"]["task"] = {"dataset": "cifar10", "dataRoot": str(tmp_path / "no-such-dir")}
        apply(cluster, namespace, bad)
        obj = wait_phase(cluster, namespace, "bad-data", op=op)
        st = obj["status"]
        assert st["phase"] == "Failed" and st["reason"] == "TooFewRewards"
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and "task.dataRoot" in degraded["message"]
        names = cluster.kubectl("get", "pods", "-n", namespace, "-l", "amlfs.io/search=bad-data", "-o", "name")
        assert sorted(names.stdout.split()) == ["pod/bad-data-e0-s0", "pod/bad-data-e0-s1"]  # never retried
    finally:
        op.stop()


def test_deleting_a_running_search_removes_its_pods(cluster, crd, monitoring, s3_server, namespace, tmp_path):
    setup_namespace(cluster, namespace, s3_server)
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    try:
        apply(cluster, namespace, manifest(s3_server, name="doomed", epochs=50))
        wait_pod_exists(cluster, namespace, "doomed-e0-s0", ("Pending", "Running"))
        cluster.kubectl("delete", "losssearch", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
        deadline = time.monotonic() + 90
        while search_pods(cluster, namespace, "doomed") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert search_pods(cluster, namespace, "doomed") == []
    finally:
        op.stop()


def packed(reference, k: int) -> dict:
    doc = json.loads(json.dumps(reference["doc"]))
    doc["spec"]["trainer"]["samplesPerPod"] = k
    return doc


def assert_same_search(s3, obj: dict, reference: dict) -> None:
    """Same thetas, checkpoint digests and mu as the reference (a sequential pack on a CPU writes the same bytes
    as its members trained alone)."""
    st, ref = obj["status"], reference["status"]
    assert st["phase"] == "Succeeded", st.get("message")
    h_ref, h = history(s3, reference), history(s3, obj)
    assert [x["thetas"] for x in h] == [x["thetas"] for x in h_ref]
    assert [x["sha256"] for x in h] == [x["sha256"] for x in h_ref]
    assert [x["rewards"] for x in h] == [x["rewards"] for x in h_ref]
    assert st["mu"] == ref["mu"] and st["best"]["sha256"] == ref["best"]["sha256"]


def test_one_pod_per_epoch_packs_every_sample(cluster, reference, monitoring, s3_server, namespace, tmp_path):
    setup_namespace(cluster, namespace, s3_server)
    doc = packed(reference, 3)  # samplesPerPod = samplesPerEpoch
    name = doc["metadata"]["name"]
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    watch = PodWatch(cluster, namespace)
    try:
        apply(cluster, namespace, doc)
        obj = wait_phase(cluster, namespace, name, op=op)
        time.sleep(3)
    finally:
        watch.stop()
        op.finish()
    assert_same_search(s3_server, obj, reference["obj"])
    assert sorted(watch.added) == [f"{name}-e{e}-p0" for e in range(3)]
    assert all(len(uids) == 1 for uids in watch.added.values())
    assert search_pods(cluster, namespace, name) == []


def test_packs_not_dividing_b_survive_operator_kills_and_a_failed_pack(
    cluster, reference, monitoring, s3_server, namespace, tmp_path
):
    setup_namespace(cluster, namespace, s3_server)
    doc = packed(reference, 2)  # B = 3: packs of 2 and 1
    name = doc["metadata"]["name"]
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path)
    watch = PodWatch(cluster, namespace)
    rng = random.Random(99)
    try:
        apply(cluster, namespace, doc)
        kills = 0
        while kills < 3 and (get(cluster, namespace, name).get("status") or {}).get("epoch", 0) < 2:
            op.start()
            time.sleep(rng.uniform(1.0, 5.0))
            op.kill()
            kills += 1
        op.start()
        crashed = f"{name}-e2-p0"
        wait_pod_exists(cluster, namespace, crashed, ("Running",))
        cluster.crash_trainer(namespace, crashed)
        obj = wait_phase(cluster, namespace, name, op=op)
        time.sleep(3)
    finally:
        watch.stop()
        op.finish()
    assert kills >= 2, "the search reached its last epoch before the operator was killed enough times"
    assert_same_search(s3_server, obj, reference["obj"])
    pods = sorted(watch.added)
    assert pods == sorted([f"{name}-e{e}-p{j}" for e in range(3) for j in (0, 1)] + [f"{crashed}-a1"]), pods
    assert all(len(uids) == 1 for uids in watch.added.values()), watch.added
    assert search_pods(cluster, namespace, name) == []
    events = cluster.kubectl_json("get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    assert "SampleRetried" in [e["reason"] for e in events["items"]]


def test_a_retrieval_search_runs_on_the_cluster_rewarded_by_map(
    cluster, crd, monitoring, s3_server, namespace, tmp_path
):
    """Open-set re-identification on digits (the bundled example's task), two samples packed per pod: the reward
    is validation mAP, and status, history and result.json say so."""
    setup_namespace(cluster, namespace, s3_server)
    doc = manifest(s3_server, name="reid", epochs=2, samplesPerEpoch=4)
    openset = yaml.safe_load((REPO / "examples" / "digits-openset-quick.yaml").read_text())["spec"]
    doc["spec"]["task"], doc["spec"]["model"] = openset["task"], openset["model"]
    doc["spec"]["trainer"]["samplesPerPod"] = 2
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    try:
        apply(cluster, namespace, doc)
        obj = wait_phase(cluster, namespace, "reid", op=op)
    finally:
        op.finish()
    st = obj["status"]
    assert st["phase"] == "Succeeded", (st.get("message"), op.log())
    assert st["rewardMetric"] == "mAP" and st["epoch"] == 2
    hist = history(s3_server, obj)
    assert all(len(h["rewards"]) == 4 and all(0 < r <= 1 for r in h["rewards"]) for h in hist)
    best = json.loads(stored(s3_server, obj, "final/result.json"))
    assert best["rewardMetric"] == "mAP" and best["reward"] == best["valMAP"]
    assert 0 < best["testMAP"] <= 1 and 0 < best["testRank1"] <= 1


def test_a_deleted_and_recreated_search_starts_fresh(cluster, crd, monitoring, s3_server, namespace, tmp_path):
    setup_namespace(cluster, namespace, s3_server)
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    try:
        first = manifest(s3_server, name="again", epochs=3, samplesPerEpoch=2, seed=3)
        apply(cluster, namespace, first)
        deadline = time.monotonic() + 300
        while (get(cluster, namespace, "again").get("status") or {}).get("epoch", 0) < 1:
            assert time.monotonic() < deadline, op.log()
            time.sleep(0.5)
        old = get(cluster, namespace, "again")
        cluster.kubectl("delete", "losssearch", "again", "-n", namespace, "--wait=true", "--timeout=60s")
        second = manifest(s3_server, name="again", epochs=2, samplesPerEpoch=2, seed=7)
        apply(cluster, namespace, second)  # at once: the first one's pods may not be collected yet
        new = wait_phase(cluster, namespace, "again", op=op)
    finally:
        op.finish()
    st = new["status"]
    assert st["phase"] == "Succeeded", (st.get("message"), op.log())
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    assert st["storageRoot"] != old["status"]["storageRoot"]
    hist = history(s3_server, new)
    assert [h["epoch"] for h in hist] == [0, 1] and [r["epoch"] for r in st["history"]] == [0, 1]
    assert [h["rewards"] for h in hist] == [r["rewards"] for r in st["history"]]
    kept = [json.loads(line) for line in stored(s3_server, old, "history.jsonl").decode().splitlines()]
    assert kept and kept[0]["thetas"] != hist[0]["thetas"]  # the first search's objects stay where they were


def never_starting(cluster, namespace: str, op: Operator, doc: dict) -> tuple[dict, dict]:
    """Apply a search whose trainer pods cannot start (start timeout 20 s); its Degraded condition once set
    (within 60 s) and the finished resource."""
    doc["spec"]["trainer"]["startTimeoutSeconds"] = 20
    name = doc["metadata"]["name"]
    try:
        apply(cluster, namespace, doc)
        deadline = time.monotonic() + 60
        degraded: dict = {}
        while time.monotonic() < deadline and degraded.get("status") != "True":
            conds = (get(cluster, namespace, name).get("status") or {}).get("conditions") or []
            degraded = next((c for c in conds if c["type"] == "Degraded"), {})
            time.sleep(0.5)
        assert degraded.get("reason") == "TrainerNotStarting", (degraded, op.log())
        obj = wait_phase(cluster, namespace, name, timeout=120, op=op)
    finally:
        op.finish()
    assert obj["status"]["phase"] == "Failed" and obj["status"]["reason"] == "TooFewRewards"
    return degraded, obj


def test_a_missing_secret_degrades_at_once_and_fails_after_the_start_timeout(
    cluster, crd, monitoring, s3_server, namespace, tmp_path
):
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()  # no Secret in this namespace
    doc = manifest(s3_server, name="nosecret", epochs=1, samplesPerEpoch=2, maxRetries=0)
    degraded, obj = never_starting(cluster, namespace, op, doc)
    assert "CreateContainerConfigError" in degraded["message"] and "amlfs-s3" in degraded["message"]
    assert "not started after 20s: CreateContainerConfigError" in obj["status"]["message"], obj["status"]


def test_an_image_that_cannot_be_pulled_degrades_at_once_and_fails_after_the_start_timeout(
    cluster, crd, monitoring, s3_server, namespace, tmp_path
):
    setup_namespace(cluster, namespace, s3_server)
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    doc = manifest(s3_server, name="noimage", epochs=1, samplesPerEpoch=2, maxRetries=0)
    doc["spec"]["trainer"]["image"] = "registry.invalid/amlfs-trainer:missing"
    degraded, obj = never_starting(cluster, namespace, op, doc)
    assert "registry.invalid/amlfs-trainer:missing" in degraded["message"], degraded
    assert any(r in degraded["message"] for r in ("ErrImagePull", "ImagePullBackOff")), degraded
    assert re.search(r"not started after 20s: (ErrImagePull|ImagePullBackOff)", obj["status"]["message"]), obj


@contextlib.contextmanager
def pushgateway_down(cluster, monitoring):
    """The Pushgateway stopped (its groups lost, as a restart without persistence loses them), then back on its
    address: the local process, or the in-cluster Deployment scaled to zero."""
    pgw = monitoring.pushgateway
    if cluster.kubelet is not None:
        pgw.stop()  # a workdir of its own's: kept
    else:
        cluster.kubectl("scale", "deployment/pushgateway", "-n", "amlfs-e2e", "--replicas=0")
    try:
        yield
    finally:
        if cluster.kubelet is None:
            cluster.kubectl("scale", "deployment/pushgateway", "-n", "amlfs-e2e", "--replicas=1")
        pgw.start()


def run_through_outage(
    cluster, reference, monitoring, s3_server, namespace, tmp_path, outage, seconds: float = 60
) -> tuple[dict, list]:
    """The reference search, with `outage` (a context manager) held for `seconds` once its first pod runs: the
    finished resource, after checking it ended as the undisturbed one did with every sample Succeeded, and the
    reasons of its events."""
    setup_namespace(cluster, namespace, s3_server)
    doc = reference["doc"]
    name = doc["metadata"]["name"]
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    try:
        apply(cluster, namespace, doc)
        wait_pod_exists(cluster, namespace, f"{name}-e0-s0", ("Running",))
        with outage:
            time.sleep(seconds)
        obj = wait_phase(cluster, namespace, name, op=op)
    finally:
        op.finish()
    assert_same_search(s3_server, obj, reference["obj"])
    assert all(s == "Succeeded" for h in history(s3_server, obj) for s in h["states"])
    events = cluster.kubectl_json("get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return obj, [e["reason"] for e in events["items"]]


def test_a_pushgateway_outage_mid_search_changes_nothing(
    cluster, reference, monitoring, s3_server, namespace, tmp_path
):
    """60 s without a Pushgateway from the first epoch on: trainers cannot push, the operator takes the rewards
    from result.json after its timeout, and the search ends as the undisturbed one did; no sample failed."""
    outage = pushgateway_down(cluster, monitoring)
    obj, reasons = run_through_outage(cluster, reference, monitoring, s3_server, namespace, tmp_path, outage)
    assert all(x.get("attempt", 0) == 0 for x in obj["status"].get("samples") or [])
    assert "RewardFromStorage" in reasons and "SampleRetried" not in reasons, reasons


@contextlib.contextmanager
def s3_down(cluster, s3):
    """S3 unreachable, its data kept: the local server stopped and started again on the same ports, or the
    in-cluster Service pointed at no pod (connections refused) and back."""
    if cluster.kubelet is not None:
        s3.stop()
    else:
        nowhere = {"spec": {"selector": {"app.kubernetes.io/name": "nowhere"}}}
        cluster.kubectl("patch", "service", "seaweedfs", "-n", "amlfs-e2e", "-p", json.dumps(nowhere))
    try:
        yield
    finally:
        if cluster.kubelet is not None:
            s3.start()
        else:
            back = {"spec": {"selector": {"app.kubernetes.io/name": "seaweedfs"}}}
            cluster.kubectl("patch", "service", "seaweedfs", "-n", "amlfs-e2e", "-p", json.dumps(back))
            s3.wait_ready()


def test_an_s3_outage_mid_epoch_changes_nothing_and_counts_no_failure(
    cluster, reference, monitoring, s3_server, namespace, tmp_path
):
    """60 s without S3 from the middle of the first epoch: trainers that cannot write exit 3 (transient) and are
    restarted without counting, the operator's promotions wait; the search ends as the undisturbed one did."""
    outage = s3_down(cluster, s3_server)
    _, reasons = run_through_outage(cluster, reference, monitoring, s3_server, namespace, tmp_path, outage)
    assert "SampleRetried" not in reasons, reasons  # restarts after exit 3 are not retries


@contextlib.contextmanager
def apiserver_restarted(cluster):
    """kube-apiserver stopped and started again with etcd kept: the local process, or on kind the static pod
    (its manifest moved out of the kubelet's manifest folder and back, as a control-plane upgrade does)."""
    if cluster.controlplane is not None:
        cluster.controlplane.stop_apiserver()
    else:
        node = os.environ.get("KIND_CLUSTER", "amlfs") + "-control-plane"
        manifest = "/etc/kubernetes/manifests/kube-apiserver.yaml"
        subprocess.run(["docker", "exec", node, "mv", manifest, "/etc/kubernetes/"], check=True)
    try:
        yield
    finally:
        if cluster.controlplane is not None:
            cluster.controlplane.start_apiserver()
        else:
            subprocess.run(["docker", "exec", node, "mv", "/etc/kubernetes/kube-apiserver.yaml", manifest], check=True)
            deadline = time.monotonic() + 120
            while cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode != 0:
                assert time.monotonic() < deadline, "kube-apiserver not back after 120 s"
                time.sleep(1)


def test_an_api_server_restart_mid_search_changes_nothing(
    cluster, reference, monitoring, s3_server, namespace, tmp_path
):
    """kube-apiserver down for 30 s while the first epoch trains: the operator's watches and the kubelet
    reconnect, pods that finished meanwhile are reported afterwards, and the search ends as the undisturbed one
    did with no sample retried."""
    obj, reasons = run_through_outage(
        cluster, reference, monitoring, s3_server, namespace, tmp_path, apiserver_restarted(cluster), seconds=30
    )
    assert all(x.get("attempt", 0) == 0 for x in obj["status"].get("samples") or [])
    assert "SampleRetried" not in reasons, reasons


def test_a_30s_scrape_sees_every_sample_reward(cluster, crd, monitoring, s3_server, namespace, tmp_path):
    """Prometheus as kube-prometheus-stack runs it, scraping every 30 s: with the operator's default group TTL
    every sample's pushed reward is scraped before the operator deletes its group, so the dashboards' reward
    panels are not empty."""
    from .services import Prometheus, ServiceError

    try:
        prom = Prometheus(
            workdir=tmp_path / "prom30", pushgateway=monitoring.pushgateway.address, scrape_interval="30s"
        )
        prom.start()
    except ServiceError as e:
        pytest.skip(str(e))  # no prometheus binary on this machine (it is on the local lane's)
    setup_namespace(cluster, namespace, s3_server)
    doc = manifest(s3_server)
    name = doc["metadata"]["name"]
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path, group_ttl=120).start()  # the default
    try:
        apply(cluster, namespace, doc)
        obj = wait_phase(cluster, namespace, name, op=op)
        assert obj["status"]["phase"] == "Succeeded", obj["status"].get("message")
        pushed = {
            (str(h["epoch"]), str(i))
            for h in history(s3_server, obj)
            for i, r in enumerate(h["rewards"])
            if r is not None
        }
        assert len(pushed) == 9
        seen: set[tuple[str, str]] = set()

        def every_sample(result: list[dict]) -> bool:
            seen.update((r["metric"]["epoch"], r["metric"]["sample"]) for r in result)
            return seen >= pushed

        query = f'max_over_time(amlfs_sample_reward{{namespace="{namespace}", search="{name}"}}[1h])'
        prom.wait_for(query, timeout=75, predicate=every_sample)  # the last epoch's: within a scrape or two
    finally:
        op.finish()
        prom.stop()
