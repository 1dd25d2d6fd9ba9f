"""The operator's pieces that need no cluster: reading the Pushgateway, sharing its reads, skipping unchanged
status writes, the pod watch's label selector."""

from __future__ import annotations

import threading
import time

import kopf
from kubernetes import client

from amlfs.controller import handlers
from amlfs.controller.reconcile import Reconciler, Settings
from amlfs.controller.rewards import PushedResult, PushgatewayReader, parse

EXPOSITION = """\
# HELP amlfs_sample_reward The sample's reward (its validation metric: result.json rewardMetric).
# TYPE amlfs_sample_reward gauge
amlfs_sample_reward{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="0",search="a"} 0.75
amlfs_sample_reward{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="1",search="a"} 0.5
amlfs_sample_reward{epoch="3",instance="",job="amlfs-trainer",namespace="other",sample="0",search="a"} 0.25
amlfs_sample_reward{epoch="0",instance="",job="someone-else",namespace="ns",sample="2",search="a"} 0.9
amlfs_sample_diverged{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="0",search="a"} 0
amlfs_sample_diverged{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="1",search="a"} 0
amlfs_sample_diverged{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="3",search="a"} 1
amlfs_sample_checkpoint_info{epoch="0",job="amlfs-trainer",namespace="ns",sample="0",search="a",sha256="ab"} 1
amlfs_sample_duration_seconds{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="0",search="a"} 3
amlfs_sample_val_loss{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="0",search="a"} 2.5
push_time_seconds{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="0",search="a"} 1.7e+09
amlfs_sample_reward{epoch="1",instance="",job="amlfs-trainer",namespace="ns",sample="0",search="q\\"x"} 0.1
"""


def test_parse_keeps_the_trainers_results_by_search():
    got = parse(EXPOSITION)
    assert got[("ns", "a")] == {
        (0, 0): PushedResult(0.75, False, "ab", 2.5),  # with its validation loss
        (0, 1): PushedResult(0.5, False, ""),
        (0, 3): PushedResult(None, True, ""),  # diverged: no reward gauge
    }
    assert got[("other", "a")] == {(3, 0): PushedResult(0.25, False, "")}
    assert got[("ns", 'q"x')] == {(1, 0): PushedResult(0.1, False, "")}  # escaped label values
    assert set(got) == {("ns", "a"), ("other", "a"), ("ns", 'q"x')}  # other jobs are not ours


class CountingReader(PushgatewayReader):
    def __init__(self, delay: float = 0.2) -> None:
        super().__init__("http://pushgateway:9091")
        self.delay = delay
        self.started: list[float] = []

    def _fetch(self):
        self.started.append(time.monotonic())
        time.sleep(self.delay)
        return parse(EXPOSITION)


def test_concurrent_reads_share_one_fetch_and_never_use_an_older_one():
    reader = CountingReader()
    t0 = time.monotonic()
    out: list[dict] = []
    threads = [threading.Thread(target=lambda: out.append(reader.results("ns", "a", not_before=t0))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reader.fetches == 1 and len(out) == 8 and all(o[(0, 0)].reward == 0.75 for o in out)
    # a snapshot taken before a pass saw its pods is not good enough for it: a new fetch starts after
    later = time.monotonic()
    reader.results("ns", "a", not_before=later)
    assert reader.fetches == 2 and reader.started[-1] >= later
    # ... but one taken after is, without fetching again
    reader.results("ns", "a", not_before=later)
    assert reader.fetches == 2
    assert reader.cached("ns", "a")[(0, 1)].reward == 0.5 and reader.cached("ns", "nope") == {}


def test_a_read_arriving_during_an_older_fetch_waits_for_the_next_one():
    reader = CountingReader(delay=0.3)
    first = threading.Thread(target=lambda: reader.results("ns", "a"))
    first.start()
    time.sleep(0.1)  # the first fetch is in flight, and started before this reader's pods were seen
    seen = time.monotonic()
    reader.results("ns", "a", not_before=seen)
    first.join()
    assert reader.fetches == 2 and reader.started[1] >= seen


class RecordingCustom:
    def __init__(self) -> None:
        self.patches: list[dict] = []

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, patch):
        self.patches.append(patch)
        return {"metadata": {"resourceVersion": str(100 + len(self.patches))}, "status": patch["status"]}


def test_an_unchanged_status_is_not_written_again():
    rec = Reconciler(client.ApiClient(), Settings())
    rec.custom = RecordingCustom()  # type: ignore[assignment]
    body = {"metadata": {"name": "s", "namespace": "ns", "resourceVersion": "7", "generation": 1}}
    status = {"phase": "Running", "epoch": 1, "start": None, "samples": [{"index": 0, "reward": None}]}
    conds = [("Ready", "False", "Running", "Running")]
    got = rec._patch_status(body, dict(status), conds)
    assert got is not None and got["metadata"]["resourceVersion"] == "101"
    stored = rec.custom.patches[0]["status"]
    stored = {k: v for k, v in stored.items() if v is not None}  # a merge patch drops nulls
    body["status"], body["metadata"]["resourceVersion"] = stored, "101"
    assert rec._patch_status(body, dict(status), conds) is None
    assert len(rec.custom.patches) == 1
    got = rec._patch_status(body, dict(status, epoch=2), conds)
    assert got is not None and got["metadata"]["resourceVersion"] == "102"


def test_the_pod_watch_asks_the_server_for_trainer_pods_only():
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    pods = kopf.Resource(group="", version="v1", plural="pods", kind="Pod", singular="pod")
    searches = kopf.Resource(group="amlfs.io", version="v1alpha1", plural="losssearches", kind="LossSearch")
    assert settings.watching.label_selectors.collect(pods) == ["amlfs.io/search"]
    assert settings.watching.label_selectors.collect(searches) == []


def test_the_operator_names_each_searchs_reward_metric_and_forgets_it():
    from prometheus_client import REGISTRY

    from amlfs import core
    from amlfs.controller import metrics
    from amlfs.spec import LossSearchSpec

    spec = LossSearchSpec.model_validate(
        {"task": {"dataset": "digits", "kind": "retrieval", "heldOutClasses": 4}, "search": {"epochs": 2}}
    )
    st, _ = core.step(spec, None, [], "file:///tmp/x")
    labels = {"namespace": "ns", "search": "reid", "reward_metric": "mAP"}
    metrics.observe_status("ns", "reid", st, spec)
    assert REGISTRY.get_sample_value("amlfs_operator_search_info", labels) == 1.0
    metrics.forget("ns", "reid", spec)
    assert REGISTRY.get_sample_value("amlfs_operator_search_info", labels) is None
