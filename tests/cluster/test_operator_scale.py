"""The operator with many searches at once, on the real control plane, with trainers that only report
(tests/support/fake_trainer.py: a shell per pod, one helper in this process), so the machine runs the operator and
not the trainers."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.cluster.test_operator import Operator, apply, crd, get, manifest, wait_phase  # noqa: F401 (crd: a fixture)
from tests.support.fake_trainer import FakeTrainers

pytestmark = pytest.mark.usefixtures("crd")


@pytest.fixture
def fakes(s3_server):
    with FakeTrainers(s3=s3_server.client()) as f:
        yield f


def fake_search(s3, fakes: FakeTrainers, name: str, sleep: float = 1.0, **search) -> dict:
    doc = manifest(s3, name=name, **search)
    doc["spec"]["storage"].pop("secretName", None)  # the fakes write with the helper's own client
    doc["spec"]["trainer"]["resources"] = {"gpu": 0, "cpu": "10m", "memory": "16Mi"}
    doc["spec"]["trainer"]["podTemplate"] = fakes.pod_template(sleep=sleep)
    return doc


def groups(monitoring, namespace: str, name: str) -> list[dict]:
    with urllib.request.urlopen(f"{monitoring.pushgateway.url}/api/v1/metrics", timeout=10) as resp:
        data = json.load(resp)["data"]
    return [g for g in data if g["labels"].get("namespace") == namespace and g["labels"].get("search") == name]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"{what}: not after {timeout}s")


def apiserver_requests(cluster, **match: str) -> float:
    """Sum of apiserver_request_total over the series whose labels include `match`."""
    total = 0.0
    for line in cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in match.items()):
            total += float(value)
    return total


def terminating_namespaces(cluster) -> list[str]:
    items = cluster.kubectl_json("get", "namespaces")["items"]
    return [n["metadata"]["name"] for n in items if (n.get("status") or {}).get("phase") == "Terminating"]


def delete_all(cluster, namespace: str) -> None:
    """Delete the namespace's searches while the operator still runs (their finalizers would hold the namespace)."""
    cluster.kubectl("delete", "losssearches", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)


def operator_metrics(op: Operator) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_many_searches_all_finish_and_a_delete_is_prompt(cluster, monitoring, s3_server, namespace, tmp_path, fakes):
    """More searches than the machine has threads for sync handlers (min(32, cpus + 4)): all of them run, and
    deleting one (with deleteOnDelete, so a deletion handler must run) does not wait for the others."""
    n = 12
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    try:
        victim = fake_search(s3_server, fakes, "victim", epochs=50, samplesPerEpoch=2)
        victim["spec"]["storage"]["deleteOnDelete"] = True
        apply(cluster, namespace, victim)
        names = [f"many-{i:02d}" for i in range(n)]
        for name in names:
            apply(cluster, namespace, fake_search(s3_server, fakes, name, epochs=3, samplesPerEpoch=2))
        wait_for(
            lambda: (get(cluster, namespace, "victim").get("status") or {}).get("epoch", 0) >= 1,
            120,
            "victim finished an epoch",
        )
        t0 = time.monotonic()
        cluster.kubectl("delete", "losssearch", "victim", "-n", namespace, "--wait=true", "--timeout=60s")
        took = time.monotonic() - t0
        assert took < 15, f"kubectl delete took {took:.1f}s\n{op.log()}"
        left = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"searches/{namespace}/victim/")
        assert left.get("KeyCount", 0) == 0, "deleteOnDelete left objects behind"
        for name in names:
            obj = wait_phase(cluster, namespace, name, timeout=300, op=op)
            assert obj["status"]["phase"] == "Succeeded", (name, obj["status"].get("message"), op.log())
            assert obj["status"]["epoch"] == 3
    finally:
        delete_all(cluster, namespace)
        op.stop()


def audited(cluster) -> bool:
    """Whether the tests run the control plane and read its audit log (not on a cluster of someone else's)."""
    return cluster.controlplane is not None and cluster.controlplane.audit_log is not None


def pod_lists_in(cluster, namespace: str) -> int | None:
    """LISTs of the namespace's pods so far, from the local control plane's audit log (None where not
    `audited`)."""
    if not audited(cluster):
        return None
    return sum(
        1
        for e in cluster.controlplane.audit_events()
        if e.get("verb") == "list"
        and (e.get("objectRef") or {}).get("resource") == "pods"
        and (e.get("objectRef") or {}).get("namespace") == namespace
    )


def test_pods_come_from_the_index_not_from_a_list_per_pass(cluster, monitoring, s3_server, namespace, tmp_path, fakes):
    """A search's passes read its pods from the operator's index: the pods of the namespace are listed once, when
    the operator starts watching, however many passes there are."""

    # On a cluster without a readable audit log: the API server's counts, which do not tell clients apart.
    # Namespaces being deleted (by earlier tests) get every kind of object listed, pods as configmaps: what the
    # configmaps' count grew by is not the operator's (which never lists configmaps).
    def lists(resource: str) -> float:
        return apiserver_requests(cluster, verb="LIST", resource=resource, scope="namespace")

    before = (0.0, 0.0)
    if not audited(cluster):  # and a namespace still being torn down lists its pods until the last one is gone
        deadline = time.monotonic() + 120
        while terminating_namespaces(cluster) and time.monotonic() < deadline:
            time.sleep(1)
        before = lists("pods"), lists("configmaps")
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    try:
        apply(cluster, namespace, fake_search(s3_server, fakes, "indexed", epochs=3, samplesPerEpoch=2))
        obj = wait_phase(cluster, namespace, "indexed", timeout=180, op=op)
        assert obj["status"]["phase"] == "Succeeded", op.log()
        passes = sum(
            float(line.rpartition(" ")[2])
            for line in operator_metrics(op).splitlines()
            if line.startswith("amlfs_operator_reconcile_duration_seconds_count")
        )
        # counted before the namespace's own deletion, whose controller lists its pods too
        pod_lists = pod_lists_in(cluster, namespace)
    finally:
        delete_all(cluster, namespace)
        op.stop()
    assert passes >= 6, passes
    if pod_lists is not None:
        # Only the operator lists this namespace's pods: its watch's first LIST (and one per re-established
        # watch). A LIST per pass (an operator without the index) makes it >= passes.
        assert 1 <= pod_lists <= 2, f"{pod_lists} LISTs of pods for {passes} passes"
        return
    # Other clients of a shared cluster add a few more, so the bound is relative to the passes.
    pod_lists = lists("pods") - before[0] - (lists("configmaps") - before[1])
    assert pod_lists < passes / 2, f"{pod_lists} LISTs of pods for {passes} passes"


def test_failed_and_deleted_searches_leave_no_pushgateway_groups_or_series(
    cluster, monitoring, s3_server, namespace, tmp_path, fakes
):
    op = Operator(cluster, namespace, monitoring, s3_server, tmp_path).start()
    try:
        # fails: sample 1 never succeeds and every sample is needed; sample 0 pushed its reward
        fakes.fail.add(("failing", 1))
        apply(
            cluster,
            namespace,
            fake_search(s3_server, fakes, "failing", epochs=2, samplesPerEpoch=2, minSamples=2, maxRetries=0),
        )
        obj = wait_phase(cluster, namespace, "failing", timeout=120, op=op)
        assert obj["status"]["phase"] == "Failed" and obj["status"]["reason"] == "TooFewRewards"
        assert (namespace, "failing", 0, 0) in fakes.pushed
        wait_for(lambda: not groups(monitoring, namespace, "failing"), 20, "groups of the failed search removed")

        # deleted while running: sample 0 pushed, sample 1 still runs
        fakes.hold.add(("doomed", 1))
        apply(cluster, namespace, fake_search(s3_server, fakes, "doomed", epochs=5, samplesPerEpoch=2))
        wait_for(lambda: groups(monitoring, namespace, "doomed"), 60, "sample 0 of doomed pushed")
        wait_for(lambda: 'search="doomed"' in operator_metrics(op), 30, "series of doomed exported")
        cluster.kubectl("delete", "losssearch", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
        wait_for(lambda: not groups(monitoring, namespace, "doomed"), 20, "groups of the deleted search removed")
        assert 'search="doomed"' not in operator_metrics(op), "series of the deleted search are still exported"
    finally:
        fakes.release()
        delete_all(cluster, namespace)
        op.stop()
