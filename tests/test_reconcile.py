"""Reconciliation passes under faults, without a cluster: the pass runs for real against recording stand-ins of the
API server's pod, event and status endpoints, and storage on file://."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from amlfs import storage
from amlfs.controller.reconcile import Reconciler, Settings

T0 = 1_900_000_000.0  # the pass's wall clock (pod timestamps are wall-clock times)


def stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Response:
    def read(self) -> bytes:
        return b"{}"

    def release_conn(self) -> None:
        pass


class Core:
    """The pod and event endpoints: records creations and deletions; names in `taken` answer 409."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.events: list[dict] = []
        self.taken: set[str] = set()

    def create_namespaced_pod(self, namespace: str, pod: dict, **_: Any) -> Response:
        if pod["metadata"]["name"] in self.taken:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(pod)
        return Response()

    def delete_namespaced_pod(self, name: str, namespace: str, **_: Any) -> Response:
        self.deleted.append(name)
        return Response()

    def create_namespaced_event(self, namespace: str, event: dict, **_: Any) -> Response:
        self.events.append(event)
        return Response()


class Custom:
    """The status subresource: applies each merge patch to the stored body."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.version = 1

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, patch):
        assert patch["metadata"]["resourceVersion"] == self.body["metadata"]["resourceVersion"]
        self.version += 1
        status = {k: v for k, v in patch["status"].items() if v is not None}
        self.body = self.body | {"status": status}
        self.body["metadata"] = self.body["metadata"] | {"resourceVersion": str(self.version)}
        return self.body


class Rewards:
    """A Pushgateway with nothing pushed."""

    def results(self, namespace: str, search: str, not_before: float | None = None) -> dict:
        return {}

    def cached(self, namespace: str, search: str) -> dict:
        return {}


class Cluster:
    """One search, its pods as the operator's index holds them, and a clock."""

    def __init__(self, tmp_path, spec: dict, uid: str = "uid-2") -> None:
        self.now = T0
        self.rec = Reconciler(client.ApiClient(), Settings(interval=5.0, progress=0), Rewards(), clock=lambda: self.now)  # type: ignore[arg-type]
        self.core, self.custom = Core(), Custom(self.body(spec, uid))
        self.rec.core, self.rec.custom = self.core, self.custom  # type: ignore[assignment]
        self.pods: dict[str, dict] = {}
        self.root = f"file://{tmp_path}/store"

    def body(self, spec: dict, uid: str) -> dict:
        return {
            "apiVersion": "amlfs.io/v1alpha1",
            "kind": "LossSearch",
            "metadata": {"name": "s", "namespace": "ns", "uid": uid, "resourceVersion": "1", "generation": 1},
            "spec": spec,
        }

    def reconcile(self):
        res = self.rec.reconcile("ns", "s", self.pods, first=False, known=self.custom.body)
        self.rec.flush(10)  # the pass's deletions and events
        return res, self.custom.body.get("status") or {}

    def finish_epoch_0(self, root: str) -> None:
        """Both samples of epoch 0 finished: checkpoint and result.json written, pods Succeeded."""
        for i in (0, 1):
            storage.write_bytes(f"{root}/epoch-0000/sample-0{i}/checkpoint.pt", b"w")
            storage.write_json(f"{root}/epoch-0000/sample-0{i}/result.json", {"status": "ok"})
            self.pod(f"s-e0-s{i}", "Succeeded", **failed(0, T0))

    def pod(self, name: str, phase: str, owner: str = "uid-2", created: float = T0, **status: Any) -> None:
        epoch, unit = name.split("-")[1:3]
        self.pods[name] = {
            "metadata": {
                "name": name,
                "labels": {"amlfs.io/epoch": epoch[1:], "amlfs.io/sample": unit[1:], "amlfs.io/search": "s"},
                "creationTimestamp": stamp(created),
                "ownerReferences": [{"uid": owner}],
                "deletionTimestamp": status.pop("deleting", None),
            },
            "status": {"phase": phase, **status},
        }


def spec(tmp_path, **search: Any) -> dict:
    return {
        "storage": {"uri": f"file://{tmp_path}/store"},
        "search": {"epochs": 2, "samplesPerEpoch": 2, "seed": 3, **search},
    }


def failed(code: int, at: float) -> dict:
    return {"containerStatuses": [{"state": {"terminated": {"exitCode": code, "finishedAt": stamp(at)}}}]}


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status["conditions"]}


def test_a_recreated_search_starts_fresh_beside_its_namesakes_objects(tmp_path):
    """The first search of that name left a finished sample (same seed: same theta) and a pod not yet collected;
    the new one neither adopts the pod nor accepts the result: it has a root of its own."""
    c = Cluster(tmp_path, spec(tmp_path), uid="uid-2")
    _, st = c.reconcile()
    assert st["storageRoot"] == f"{c.root}/ns/s/uid-2"
    assert [p["metadata"]["name"] for p in c.core.created] == ["s-e0-s0", "s-e0-s1"]
    theta = st["samples"][0]["theta"]
    storage.write_json(  # where the namesake (no UID in its root) finished sample 0
        f"{c.root}/ns/s/epoch-0000/sample-00/result.json", {"status": "ok", "reward": 0.9, "theta": theta}
    )
    c.pod("s-e0-s0", "Succeeded", owner="uid-1")  # the namesake's pod, not yet garbage-collected
    c.pod("s-e0-s1", "Running")
    c.core.taken, c.core.created = {"s-e0-s0"}, []
    c.rec.recent.ttl = 0.0
    _, st = c.reconcile()
    assert [x["state"] for x in st["samples"]] == ["Pending", "Running"]  # sample 0 waits for its own pod
    assert st["storageRoot"] == f"{c.root}/ns/s/uid-2" and st["epoch"] == 0
    assert "s-e0-s0" not in c.core.deleted  # the namesake's pod is the garbage collector's


def test_a_pod_that_cannot_start_degrades_at_once_and_is_given_up_after_the_start_timeout(tmp_path):
    c = Cluster(tmp_path, spec(tmp_path) | {"trainer": {"startTimeoutSeconds": 120}})
    c.reconcile()
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "amlfs-trainer:nope"'}
    c.pod("s-e0-s0", "Pending", containerStatuses=[{"state": {"waiting": waiting}}])
    creating = [{"state": {"waiting": {"reason": "ContainerCreating"}}}]
    c.pod("s-e0-s1", "Pending", created=T0 + 60, containerStatuses=creating)
    c.now = T0 + 5
    _, st = c.reconcile()
    degraded = conditions(st)["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "TrainerNotStarting"
    assert "sample 0: ImagePullBackOff" in degraded["message"] and "amlfs-trainer:nope" in degraded["message"]
    assert "sample 1" not in degraded["message"]  # a container being created is a normal start
    assert st["samples"][0]["message"].startswith("waiting: ImagePullBackOff")
    c.now = T0 + 121
    _, st = c.reconcile()
    x0 = st["samples"][0]
    assert (
        x0["attempt"] == 1 and x0["state"] == "Pending" and "not started after 120s: ImagePullBackOff" in x0["message"]
    )
    assert "s-e0-s0" in c.core.deleted  # so that it never starts late beside its retry
    assert st["samples"][1]["attempt"] == 0  # not stuck, and 61 s old: left alone


def test_a_missing_secret_fails_the_search_with_the_reason_after_the_retries(tmp_path):
    c = Cluster(tmp_path, spec(tmp_path, maxRetries=0, minSamples=2) | {"trainer": {"startTimeoutSeconds": 60}})
    c.reconcile()
    why = {"reason": "CreateContainerConfigError", "message": 'secret "amlfs-s3" not found'}
    for name in ("s-e0-s0", "s-e0-s1"):
        c.pod(name, "Pending", containerStatuses=[{"state": {"waiting": why}}])
    c.now = T0 + 61
    _, st = c.reconcile()
    assert st["phase"] == "Failed" and st["reason"] == "TooFewRewards"
    assert 'not started after 60s: CreateContainerConfigError: secret "amlfs-s3" not found' in st["message"]


def test_retries_back_off_exponentially_and_platform_failures_are_not_counted(tmp_path):
    c = Cluster(tmp_path, spec(tmp_path, maxRetries=3))
    c.reconcile()
    c.pod("s-e0-s0", "Failed", **failed(1, T0))  # a crash: counted, retried after the backoff
    c.pod("s-e0-s1", "Failed", **failed(3, T0))  # storage unreachable: the platform's failure, not counted
    c.now, c.core.created = T0 + 1, []
    res, st = c.reconcile()
    assert [(x["attempt"], x["restarts"]) for x in st["samples"]] == [(1, 0), (0, 1)]
    assert "transient" in st["samples"][1]["message"]
    assert c.core.created == [] and 0 < res.delay <= 4  # both held back: first backoff 5 s x jitter [0.5, 1]
    c.now = T0 + 5.01
    c.reconcile()
    assert sorted(p["metadata"]["name"] for p in c.core.created) == ["s-e0-s0-a1", "s-e0-s1-r1"]
    # the next failure of the same sample waits twice as long
    c.pod("s-e0-s0-a1", "Failed", **failed(1, T0 + 20))
    c.now, c.core.created = T0 + 24, []
    res, st = c.reconcile()
    assert st["samples"][0]["attempt"] == 2 and c.core.created == [] and res.delay <= 6
    c.now = T0 + 30.01
    c.reconcile()
    assert [p["metadata"]["name"] for p in c.core.created] == ["s-e0-s0-a2"]


def test_an_evicted_pod_is_replaced_at_once_but_only_once_it_is_gone(tmp_path):
    c = Cluster(tmp_path, spec(tmp_path))
    c.reconcile()
    c.pod("s-e0-s0", "Running", deleting=stamp(T0))  # being evicted: its trainer may still write
    c.pod("s-e0-s1", "Running")
    c.core.created = []
    _, st = c.reconcile()
    assert [x["state"] for x in st["samples"]] == ["Running", "Running"] and c.core.created == []
    evicted = {"reason": "Evicted", "conditions": [{"type": "DisruptionTarget", "status": "True"}]}
    c.pod("s-e0-s0", "Failed", **(failed(137, T0) | evicted))
    c.now = T0 + 1
    _, st = c.reconcile()
    assert st["samples"][0]["restarts"] == 1
    assert [p["metadata"]["name"] for p in c.core.created] == ["s-e0-s0-r1"]  # no backoff after an eviction


@pytest.mark.parametrize("problem", ["spec", "storage"])
def test_what_the_operator_cannot_work_with_degrades_the_search_until_it_is_fixed(tmp_path, problem):
    good = spec(tmp_path)
    c = Cluster(tmp_path, good)
    if problem == "spec":
        c.custom.body["spec"] = good | {"search": {"samplesPerEpoch": 1}}
    else:
        c.custom.body["spec"] = {"search": good["search"]}  # no storage, and the operator has no default
    _, st = c.reconcile()
    degraded = conditions(st)["Degraded"]
    assert st["phase"] == "Pending" and degraded["status"] == "True"
    assert degraded["reason"] == ("InvalidSpec" if problem == "spec" else "NoStorage")
    assert ("samplesPerEpoch" if problem == "spec" else "spec.storage.uri") in degraded["message"]
    c.custom.body["spec"] = good
    _, st = c.reconcile()
    assert st["phase"] == "Running" and st["reason"] == "" and conditions(st)["Degraded"]["status"] == "False"
    assert len(st["samples"]) == 2 and len(c.core.created) == 2


def test_a_storage_failure_degrades_the_search_with_an_event_and_the_next_pass_redoes_it(tmp_path):
    from amlfs.controller.rewards import PushedResult

    c = Cluster(tmp_path, spec(tmp_path, epochs=1))
    _, st = c.reconcile()
    root, c.core.events = st["storageRoot"], []
    pushed = {(0, 0): PushedResult(0.5, False, "a" * 64), (0, 1): PushedResult(0.7, False, "b" * 64)}
    c.rec.rewards.results = lambda *a, **k: pushed  # type: ignore[method-assign]
    c.pod("s-e0-s0", "Succeeded", **failed(0, T0))
    c.pod("s-e0-s1", "Succeeded", **failed(0, T0))
    # the best sample's checkpoint is not where its result says: the promotion cannot copy it
    _, st = c.reconcile()
    degraded = conditions(st)["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "StorageError" and root in degraded["message"]
    assert st["epoch"] == 0 and st["phase"] == "Running"  # nothing advanced
    assert [e["reason"] for e in c.core.events] == ["StorageError"]
    for i in (0, 1):
        storage.write_bytes(f"{root}/epoch-0000/sample-0{i}/checkpoint.pt", b"weights")
        storage.write_json(f"{root}/epoch-0000/sample-0{i}/result.json", {"status": "ok"})
    _, st = c.reconcile()
    assert st["phase"] == "Succeeded" and st["reason"] == "Completed"
    assert conditions(st)["Degraded"]["status"] == "False"
    assert storage.read_bytes(f"{root}/final/checkpoint.pt") == b"weights"


def test_a_closed_epochs_pushgateway_groups_stay_until_scraped_then_go(tmp_path):
    from amlfs.controller.rewards import PushedResult

    c = Cluster(tmp_path, spec(tmp_path, epochs=2))
    c.rec.settings.pushgateway, c.rec.settings.group_ttl = "http://pushgateway:9091", 60.0
    pushed = {(0, 0): PushedResult(0.5, False, "a" * 64), (0, 1): PushedResult(0.7, False, "b" * 64)}
    deleted: list[tuple[int, int]] = []
    rewards = c.rec.rewards
    rewards.results = lambda *a, **k: pushed  # type: ignore[method-assign]
    rewards.cached = lambda *a, **k: {k: v for k, v in pushed.items() if k not in deleted}  # type: ignore[method-assign]
    rewards.delete = lambda ns, name, e, s: deleted.append((e, s))  # type: ignore[attr-defined]
    rewards.snapshot = lambda *a: None  # type: ignore[attr-defined]
    c.reconcile()
    c.finish_epoch_0(c.custom.body["status"]["storageRoot"])
    c.now = T0 + 1
    res, st = c.reconcile()
    assert st["epoch"] == 1 and deleted == []  # closed, but not yet scraped for sure
    assert res.delay <= 5.0
    c.now = T0 + 40
    c.reconcile()
    assert deleted == []
    c.now = T0 + 61.5
    c.reconcile()
    assert sorted(deleted) == [(0, 0), (0, 1)]


def test_the_operators_own_s3_calls_go_to_the_searchs_endpoint(tmp_path, monkeypatch):
    """Promotions, history and result reads use spec.storage.endpoint (where the pods write), with the operator's
    credentials; without it, the operator's environment. Here the search's endpoint refuses connections."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # the operator's default: also nothing there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setattr(storage, "_clients", {})
    c = Cluster(
        tmp_path, spec(tmp_path, epochs=1) | {"storage": {"uri": "s3://bucket/p", "endpoint": "http://127.0.0.1:1"}}
    )
    _, st = c.reconcile()
    assert st["storageRoot"] == "s3://bucket/p/ns/s/uid-2"
    with storage.using_endpoint("http://127.0.0.1:1"):
        assert storage.s3_client().meta.endpoint_url == "http://127.0.0.1:1"
    assert storage.s3_client().meta.endpoint_url == "http://127.0.0.1:9"
    for i in (0, 1):
        c.pod(f"s-e0-s{i}", "Succeeded", **failed(0, T0))
    c.now, c.rec.settings.reward_timeout = T0 + 60, 1.0  # no reward pushed: the results are read from storage
    asked: list[str] = []
    monkeypatch.setattr(storage, "read_json", lambda uri: asked.append(storage._endpoint()) or {})
    c.reconcile()
    assert asked == ["http://127.0.0.1:1", "http://127.0.0.1:1"]
    from concurrent.futures import ThreadPoolExecutor

    seen: list[str] = []
    with storage.using_endpoint("http://127.0.0.1:1"):
        c.rec._each([lambda: seen.append(storage.s3_client().meta.endpoint_url)])  # the pass's fan-out threads
    assert seen == ["http://127.0.0.1:1"]
    with ThreadPoolExecutor(1) as pool:  # a plain thread does not inherit it
        assert pool.submit(lambda: storage.s3_client().meta.endpoint_url).result() == "http://127.0.0.1:9"


def test_a_search_begun_before_prior_adjustment_keeps_its_space_when_the_crd_defaults_it(tmp_path):
    """A search whose mu has the bounded space's M+2 numbers (begun before search.priorAdjustment existed) meets
    an upgraded CRD that defaults the field to true: it closes its epoch and samples in the space it began in."""
    from amlfs.controller.rewards import PushedResult

    c = Cluster(tmp_path, spec(tmp_path, epochs=2, priorAdjustment=False))
    pushed = {(0, 0): PushedResult(0.5, False, "a" * 64), (0, 1): PushedResult(0.7, False, "b" * 64)}
    c.rec.rewards.results = lambda *a, **k: pushed  # type: ignore[method-assign]
    _, st = c.reconcile()
    dim = len(st["mu"])
    assert dim == 6 + 2 and all(len(x["theta"]) == dim for x in st["samples"])
    c.custom.body["spec"]["search"]["priorAdjustment"] = True  # what the upgraded CRD's default says
    c.finish_epoch_0(st["storageRoot"])
    c.now = T0 + 1
    _, st = c.reconcile()
    assert st["epoch"] == 1 and len(st["mu"]) == dim and st.get("reason", "") == "", st.get("message")
    assert all(len(x["theta"]) == dim for x in st["samples"])
    assert len(c.core.created) == 4  # epoch 1's pods


def test_a_search_begun_before_the_poly_term_keeps_its_loss_when_the_crd_defaults_it(tmp_path):
    """A search begun before search.polyTerm existed (its status records no term) meets an upgraded CRD that
    defaults the field to 1: its next epoch's pods still train without the term; a new search records it."""
    import json

    from amlfs.controller.rewards import PushedResult

    c = Cluster(tmp_path, spec(tmp_path, epochs=2, polyTerm=0))
    pushed = {(0, 0): PushedResult(0.5, False, "a" * 64), (0, 1): PushedResult(0.7, False, "b" * 64)}
    c.rec.rewards.results = lambda *a, **k: pushed  # type: ignore[method-assign]
    _, st = c.reconcile()
    assert st["polyTerm"] == 0.0
    del c.custom.body["status"]["polyTerm"]  # as an operator before the field wrote it
    c.custom.body["spec"]["search"]["polyTerm"] = 1.0  # what the upgraded CRD's default says
    c.finish_epoch_0(st["storageRoot"])
    c.now, c.core.created = T0 + 1, []
    _, st = c.reconcile()
    assert st["epoch"] == 1 and st.get("reason", "") == "", st.get("message")
    assert len(c.core.created) == 2  # epoch 1's pods

    def trained_term(pod: dict) -> float:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        return json.loads(env["AMLFS_SPEC"])["search"]["polyTerm"]

    assert [trained_term(pod) for pod in c.core.created] == [0.0, 0.0]

    fresh = Cluster(tmp_path / "new", spec(tmp_path / "new"))
    _, st = fresh.reconcile()
    assert st["polyTerm"] == 1.0
    assert trained_term(fresh.core.created[0]) == 1.0


def test_a_pass_behind_a_lagging_watch_starts_from_its_own_write_without_a_read(tmp_path):
    """While the watch still shows the version a pass wrote over, the next pass starts from the resource as the
    write returned it (no GET); a version nobody here wrote, or a conflict, means a fresh read."""
    from amlfs.controller.handlers import SearchState, known_body

    c = Cluster(tmp_path, spec(tmp_path))
    before = c.custom.body
    state = SearchState()
    assert known_body(state, before) is None  # nothing written yet: read
    res = c.rec.reconcile("ns", "s", c.pods, first=True, known=before)
    assert res.written == c.custom.body["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]
    assert res.read == before["metadata"]["resourceVersion"] and res.body == c.custom.body
    state.record(res)
    lagging = known_body(state, before)  # the watch has not brought the write yet
    assert lagging == c.custom.body and lagging is not res.body  # a copy: the pass may change it
    assert known_body(state, c.custom.body) == c.custom.body  # the watch caught up
    assert known_body(state, before | {"metadata": before["metadata"] | {"resourceVersion": "99"}}) is None
    # the pass from the held resource writes over the current version (the stand-in checks the resourceVersion)
    c.finish_epoch_0(res.body["status"]["storageRoot"])
    res2 = c.rec.reconcile("ns", "s", c.pods, known=lagging)
    assert res2.written == c.custom.body["metadata"]["resourceVersion"] and res2.read == res.written
    assert c.custom.body["status"] != res.body["status"]  # the finished samples are in the status
    state.record(res2)
    # the watch two writes behind (still at the version the first write replaced), or one behind: the last write
    assert known_body(state, before) == c.custom.body == known_body(state, res.body)
    assert known_body(state, c.custom.body) == c.custom.body
    # someone else wrote meanwhile: the write is refused, and whatever is held is stale

    def refuse(*_: Any) -> None:
        raise ApiException(status=409, reason="Conflict")

    c.custom.patch_namespaced_custom_object_status = refuse  # type: ignore[method-assign]
    stale = c.rec.reconcile("ns", "s", c.pods, known=res2.body | {"status": res.body["status"]})
    assert stale.conflict and not stale.written and stale.body is None
    state.record(stale)
    assert known_body(state, c.custom.body) is None and known_body(state, before) is None  # read afresh


def test_an_epoch_ends_on_its_trainers_pushed_results_before_the_kubelet_reports_the_pods(tmp_path):
    """A result its trainer pushed after writing it to the sample's own output prefix is complete in storage: the
    epoch closes on it while the pods are still Running. A push naming another prefix (a namesake's, with no UID in
    it) or none (a trainer that does not say) waits for the pod to end, as before."""
    from amlfs.controller.rewards import PushedResult

    c = Cluster(tmp_path, spec(tmp_path, epochs=2))
    c.rec.settings.pushgateway = "http://pushgateway:9091"
    pushed: dict[tuple[int, int], PushedResult] = {}
    c.rec.rewards.cached = lambda *a, **k: dict(pushed)  # type: ignore[method-assign]
    res, st = c.reconcile()
    root = st["storageRoot"]
    mine = [f"{root}/epoch-0000/sample-0{i}" for i in (0, 1)]
    assert dict(res.awaiting) == {(0, 0): mine[0], (0, 1): mine[1]}  # what the reward poll looks for
    for i in (0, 1):
        storage.write_bytes(f"{mine[i]}/checkpoint.pt", b"w")
        storage.write_json(f"{mine[i]}/result.json", {"status": "ok"})
        c.pod(f"s-e0-s{i}", "Running")
    pushed[(0, 0)] = PushedResult(0.5, False, "a" * 64, output=mine[0])
    pushed[(0, 1)] = PushedResult(0.9, False, "b" * 64, output=f"{c.root}/ns/s/epoch-0000/sample-01")
    res, st = c.reconcile()
    assert [(x["state"], x.get("reward")) for x in st["samples"]] == [("Succeeded", 0.5), ("Running", None)]
    assert dict(res.awaiting) == {(0, 1): mine[1]} and st["epoch"] == 0
    pushed[(0, 1)] = PushedResult(0.7, False, "b" * 64)  # no output named: only the pod's end counts
    _, st = c.reconcile()
    assert st["samples"][1]["state"] == "Running"
    pushed[(0, 1)] = PushedResult(0.7, False, "b" * 64, output=mine[1] + "/")
    c.core.created = []
    res, st = c.reconcile()
    assert st["epoch"] == 1 and st["history"][0]["bestReward"] == 0.7
    assert [p["metadata"]["name"] for p in c.core.created] == ["s-e1-s0", "s-e1-s1"]
    assert sorted(c.core.deleted) == ["s-e0-s0", "s-e0-s1"]  # their trainers are done: no need to wait
    assert set(res.awaiting) == {(1, 0), (1, 1)}


def test_the_pass_that_starts_an_epoch_reports_the_handoff_from_the_last_push_to_the_new_pods(tmp_path):
    """amlfs_operator_epoch_handoff_seconds: once per epoch started, its stages and, from the Pushgateway's push
    time of the last result, detect (until the pass was due) and total (until the next epoch's pods exist)."""
    import time

    from prometheus_client import REGISTRY

    from amlfs.controller.rewards import PushedResult

    def count(stage: str) -> float:
        return REGISTRY.get_sample_value("amlfs_operator_epoch_handoff_seconds_count", {"stage": stage}) or 0.0

    def total(stage: str) -> float:
        return REGISTRY.get_sample_value("amlfs_operator_epoch_handoff_seconds_sum", {"stage": stage}) or 0.0

    stages = ("detect", "due", "queue", "read", "observe", "storage", "status", "pods", "total")
    c = Cluster(tmp_path, spec(tmp_path, epochs=2))
    c.rec.settings.pushgateway = "http://pushgateway:9091"
    pushed: dict[tuple[int, int], PushedResult] = {}
    c.rec.rewards.cached = lambda *a, **k: dict(pushed)  # type: ignore[method-assign]
    _, st = c.reconcile()
    before = {s: (count(s), total(s)) for s in stages}
    root = st["storageRoot"]
    now, outs = time.time(), [f"{root}/epoch-0000/sample-0{i}" for i in (0, 1)]
    for i in (0, 1):
        storage.write_bytes(f"{outs[i]}/checkpoint.pt", b"w")
        storage.write_json(f"{outs[i]}/result.json", {"status": "ok"})
        c.pod(f"s-e0-s{i}", "Running")
    pushed[(0, 0)] = PushedResult(0.5, False, "a" * 64, output=outs[0], pushed_at=now - 3.0)
    _, st = c.reconcile()  # records the first result only: starts no epoch
    assert st["epoch"] == 0 and {s: (count(s), total(s)) for s in stages} == before
    pushed[(0, 1)] = PushedResult(0.6, False, "a" * 64, output=outs[1], pushed_at=now - 2.0)
    due = time.monotonic() - 0.5  # the pass was due half a second before its worker took it
    res = c.rec.reconcile("ns", "s", c.pods, seen_at=due + 0.2, known=c.custom.body, due_at=due)
    c.rec.flush(10)
    assert res.epoch == 1 and len(c.core.created) == 4
    assert all(count(s) == before[s][0] + 1 for s in stages)
    took = {s: total(s) - before[s][1] for s in stages}
    assert took["total"] >= 2.0 and took["detect"] >= 1.5  # from the later of the two pushes, 2 s ago
    assert took["due"] == pytest.approx(0.2, abs=0.01) and took["queue"] >= 0.3
    assert took["total"] >= took["detect"] + sum(took[s] for s in stages[1:-1]) - 0.01


def _at_handoff(tmp_path) -> tuple[Cluster, dict[str, Any]]:
    """A search whose epoch 0 has both results pushed (its trainers wrote them to their own prefixes) while its pods
    still show Running: the next pass starts epoch 1."""
    from amlfs.controller.rewards import PushedResult

    c = Cluster(tmp_path, spec(tmp_path, epochs=3))
    c.rec.settings.pushgateway = "http://pushgateway:9091"
    _, st = c.reconcile()
    outs = [f"{st['storageRoot']}/epoch-0000/sample-0{i}" for i in (0, 1)]
    pushed = {}
    for i in (0, 1):
        storage.write_bytes(f"{outs[i]}/checkpoint.pt", b"w")
        storage.write_json(f"{outs[i]}/result.json", {"status": "ok"})
        c.pod(f"s-e0-s{i}", "Running")
        pushed[(0, i)] = PushedResult(0.5 + i / 10, False, "a" * 64, output=outs[i])
    c.rec.rewards.cached = lambda *a, **k: dict(pushed)  # type: ignore[method-assign]
    c.core.created = []
    return c, st


def test_the_pass_that_starts_an_epoch_creates_its_pods_while_it_writes_the_status(tmp_path):
    """The status write and the next epoch's pod creations, the two longest requests between epochs, overlap: the
    stand-in's status write waits for the pods, which only a pass creating them alongside the write lets come."""
    import threading

    c, _ = _at_handoff(tmp_path)
    both = threading.Event()
    create, write = c.core.create_namespaced_pod, c.custom.patch_namespaced_custom_object_status
    seen: list[bool] = []

    def creating(namespace: str, pod: dict, **kw: Any) -> Response:
        got = create(namespace, pod, **kw)
        if len(c.core.created) == 2:
            both.set()
        return got

    def writing(*args: Any) -> dict:
        seen.append(both.wait(timeout=5))
        return write(*args)

    c.core.create_namespaced_pod, c.custom.patch_namespaced_custom_object_status = creating, writing  # type: ignore[method-assign]
    res, st = c.reconcile()
    assert st["epoch"] == 1 and res.epoch == 1 and seen == [True]
    assert sorted(p["metadata"]["name"] for p in c.core.created) == ["s-e1-s0", "s-e1-s1"]


def test_a_failed_status_write_takes_back_the_pods_it_started_and_they_are_never_adopted(tmp_path):
    """Created with a status write that was refused (someone changed the resource), the next epoch's pods are
    deleted at once: the pass redone may decide otherwise (an edit of the spec). While a pod taken back is still
    there, its name is not adopted ("already exists") nor its pod read as the sample's; once it is gone, the
    sample's own pod is made."""
    c, _ = _at_handoff(tmp_path)
    write = c.custom.patch_namespaced_custom_object_status

    def refuse(*_: Any) -> None:
        raise ApiException(status=409, reason="Conflict")

    c.custom.patch_namespaced_custom_object_status = refuse  # type: ignore[method-assign]
    res, st = c.reconcile()
    assert res.conflict and st["epoch"] == 0
    made = sorted(p["metadata"]["name"] for p in c.core.created)
    assert made == ["s-e1-s0", "s-e1-s1"] and sorted(c.core.deleted) == made
    # the pass redone decides the same; the pods taken back are still terminating, as the index shows
    c.custom.patch_namespaced_custom_object_status = write  # type: ignore[method-assign]
    c.core.created, c.core.deleted, c.core.taken = [], [], set(made)
    for name in made:
        c.pod(name, "Running", deleting=stamp(T0))
    res, st = c.reconcile()
    assert st["epoch"] == 1 and [x["state"] for x in st["samples"]] == ["Pending", "Pending"]  # not those pods
    assert c.core.created == [] and res.delay <= 1.0  # asked again once the names are free
    res, st = c.reconcile()  # still there: still not theirs
    assert [x["state"] for x in st["samples"]] == ["Pending", "Pending"] and c.core.created == []
    c.core.taken = set()
    for name in made:
        del c.pods[name]
    c.reconcile()
    assert sorted(p["metadata"]["name"] for p in c.core.created) == made
    c.core.created = []
    for name in made:
        c.pod(name, "Running")
    _, st = c.reconcile()  # the new pods are the samples' own
    assert [x["state"] for x in st["samples"]] == ["Running", "Running"] and c.core.created == []


def test_progress_is_written_at_most_every_progress_seconds_and_decisions_at_once(tmp_path):
    """Samples that only started, or finished while others train, wait `Settings.progress` after the last status
    write (a pass is due when it is over); an edit, a failure and the epoch's close are written at once, the
    progress held back with them."""
    from amlfs.controller.rewards import PushedResult

    c = Cluster(tmp_path, spec(tmp_path, epochs=2, samplesPerEpoch=3, maxRetries=2))
    c.rec.settings.progress = 5.0
    c.rec.settings.pushgateway = "http://pushgateway:9091"
    pushed: dict[tuple[int, int], PushedResult] = {}
    c.rec.rewards.cached = lambda *a, **k: dict(pushed)  # type: ignore[method-assign]
    res = c.rec.reconcile("ns", "s", c.pods, first=True, known=c.custom.body)
    root = c.custom.body["status"]["storageRoot"]
    writes = c.custom.version

    def states() -> list[str]:
        return [x["state"] for x in c.custom.body["status"]["samples"]]

    for i in (0, 1, 2):
        c.pod(f"s-e0-s{i}", "Running")
    c.now = T0 + 1
    res, _ = c.reconcile()
    assert c.custom.version == writes and states() == ["Pending"] * 3  # held: written 1 s ago
    assert 3.9 < res.delay <= 4.0  # the pass that writes it
    out = f"{root}/epoch-0000/sample-00"
    storage.write_bytes(f"{out}/checkpoint.pt", b"w")
    storage.write_json(f"{out}/result.json", {"status": "ok"})
    pushed[(0, 0)] = PushedResult(0.5, False, "a" * 64, output=out)
    c.now = T0 + 2
    res, _ = c.reconcile()
    assert c.custom.version == writes and not any(k == (0, 0) for k in res.awaiting)  # seen, not yet written
    c.now = T0 + 5
    c.reconcile()
    assert c.custom.version == writes + 1 and states() == ["Succeeded", "Running", "Running"]
    # an edit is acknowledged at once, with the progress since
    c.pod("s-e0-s1", "Succeeded")  # no result pushed yet: still running for the status
    c.custom.body["metadata"]["generation"] = 2
    c.pods.pop("s-e0-s2")
    c.pod("s-e0-s2", "Running")
    c.now = T0 + 6
    c.reconcile()
    assert c.custom.version == writes + 2 and c.custom.body["status"]["observedGeneration"] == 2
    # a failure (its retry) is a decision: at once, 1 s after the last write
    c.pod("s-e0-s2", "Failed", **failed(1, T0 + 6))
    c.now = T0 + 7
    c.reconcile()
    assert c.custom.version == writes + 3 and c.custom.body["status"]["samples"][2]["attempt"] == 1
    # the epoch's close, 1 s later, is written at once too
    for i in (1, 2):
        out = f"{root}/epoch-0000/sample-0{i}"
        storage.write_bytes(f"{out}/checkpoint.pt", b"w")
        storage.write_json(f"{out}/result.json", {"status": "ok"})
        pushed[(0, i)] = PushedResult(0.6 + i / 10, False, "b" * 64, output=out)
    c.now = T0 + 8
    c.reconcile()
    assert c.custom.version == writes + 4 and c.custom.body["status"]["epoch"] == 1
    # with progress 0, each is written at once
    c.rec.settings.progress = 0
    c.pod("s-e1-s0", "Running")
    c.reconcile()
    assert c.custom.version == writes + 5 and states()[0] == "Running"


def test_each_epoch_is_one_event_that_says_its_close_its_promotion_and_the_next_start(tmp_path):
    from amlfs.controller.rewards import PushedResult

    c = Cluster(tmp_path, spec(tmp_path, epochs=2))
    pushed: dict[tuple[int, int], PushedResult] = {}
    c.rec.rewards.results = lambda *a, **k: dict(pushed)  # type: ignore[method-assign]
    _, st = c.reconcile()
    root = st["storageRoot"]
    for epoch in (0, 1):
        for i in (0, 1):
            out = f"{root}/epoch-000{epoch}/sample-0{i}"
            storage.write_bytes(f"{out}/checkpoint.pt", b"w")
            storage.write_json(f"{out}/result.json", {"status": "ok"})
            pushed[(epoch, i)] = PushedResult(0.5 + i / 10 + epoch / 100, False, "a" * 64, output=out)
            c.pod(f"s-e{epoch}-s{i}", "Succeeded", **failed(0, T0))
        _, st = c.reconcile()
    assert st["phase"] == "Succeeded"
    told = [(e["reason"], e["message"]) for e in c.core.events]
    assert [r for r, _ in told] == ["EpochStarted", "EpochCompleted", "EpochCompleted", "SearchSucceeded"], told
    assert told[0][1] == "epoch 0 started: 2 samples"
    first, last = told[1][1], told[2][1]
    assert first.startswith("epoch 0: best reward 0.6000 (sample 1), mean 0.5500; epoch 0 sample 1 promoted to ")
    assert first.endswith(f"{root}/best; epoch 1 started: 2 samples"), first
    assert last.startswith("epoch 1: best reward 0.6100 (sample 1)") and f"{root}/final" in last
    assert "started" not in last
