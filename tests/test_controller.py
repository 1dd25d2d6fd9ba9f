"""The operator's pieces that need no cluster: reading the Pushgateway, sharing its reads, skipping unchanged
status writes, the pod watch's label selector."""

from __future__ import annotations

import asyncio
import threading
import time

import kopf
import pytest
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
amlfs_sample_output_info{epoch="0",job="amlfs-trainer",namespace="ns",output="s3://b/a/0",sample="0",search="a"} 1
push_time_seconds{epoch="0",instance="",job="amlfs-trainer",namespace="ns",sample="0",search="a"} 1.7e+09
amlfs_sample_reward{epoch="1",instance="",job="amlfs-trainer",namespace="ns",sample="0",search="q\\"x"} 0.1
"""


def test_parse_keeps_the_trainers_results_by_search():
    got = parse(EXPOSITION)
    assert got[("ns", "a")] == {
        (0, 0): PushedResult(0.75, False, "ab", 2.5, "s3://b/a/0", 1.7e9),  # val loss, output, push time
        (0, 1): PushedResult(0.5, False, ""),
        (0, 3): PushedResult(None, True, ""),  # diverged: no reward gauge
    }
    assert got[("other", "a")] == {(3, 0): PushedResult(0.25, False, "")}
    assert got[("ns", 'q"x')] == {(1, 0): PushedResult(0.1, False, "")}  # escaped label values
    assert set(got) == {("ns", "a"), ("other", "a"), ("ns", 'q"x')}  # other jobs are not ours


def test_a_parse_with_the_previous_lines_parses_only_new_ones_and_forgets_the_gone():
    from amlfs.controller import rewards

    memo: dict = {}
    assert parse(EXPOSITION, memo) == parse(EXPOSITION)
    ours = [line for line in EXPOSITION.splitlines() if line.startswith(rewards._PREFIXES)]
    assert set(memo) == set(ours)
    parsed: list[str] = []
    real = rewards._parse_line
    rewards._parse_line = lambda line: parsed.append(line) or real(line)  # type: ignore[assignment]
    try:
        new = 'amlfs_sample_reward{epoch="1",job="amlfs-trainer",namespace="ns",sample="0",search="a"} 0.6\n'
        gone = ours[0]
        got = parse(EXPOSITION.replace(gone + "\n", "") + new, memo)
    finally:
        rewards._parse_line = real  # type: ignore[assignment]
    assert parsed == [new.strip()]  # only the new line was parsed
    assert got[("ns", "a")][(1, 0)] == PushedResult(0.6, False, "")
    assert gone not in memo and new.strip() in memo  # the memo holds this read's lines only


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


class NotStopped:
    def __bool__(self) -> bool:
        return False


def test_pods_starting_together_make_one_pass_after_the_settle_and_an_ending_pod_one_at_once():
    async def scenario() -> None:
        rt = handlers.Runtime(Settings(settle=0.3), None, None, None, None)  # type: ignore[arg-type]
        state = rt.state("ns", "s")
        state.written = "8"
        labels = {"amlfs.io/search": "s", "amlfs.io/epoch": "0"}

        async def pod_is(phase: str, memo: kopf.Memo) -> None:
            await handlers.pod_changed(
                type="MODIFIED", namespace="ns", labels=labels, meta={}, status={"phase": phase}, memo=memo
            )

        memos = [kopf.Memo(amlfs=rt) for _ in range(3)]  # each pod has its own copy of the memo
        t0 = time.monotonic()
        for memo in memos:
            await pod_is("Running", memo)
            await asyncio.sleep(0.05)
        assert t0 + 0.3 <= state.due <= t0 + 0.35  # the first start set it; the later ones do not push it back
        slept = asyncio.create_task(state.sleep(NotStopped()))  # type: ignore[arg-type]
        await asyncio.sleep(0.02)
        assert not slept.done()
        await pod_is("Succeeded", memos[0])
        await asyncio.wait_for(slept, timeout=0.1)  # a pod that ended: at once
        assert time.monotonic() - t0 < 0.3
        state.due = float("inf")
        await pod_is("Succeeded", memos[0])  # the same phase again: nothing new
        assert state.due == float("inf")
        state.echoes.extend(["7", "8"])  # statuses written here, the later one already back from the write
        await handlers.search_changed(namespace="ns", name="s", meta={"resourceVersion": "7"}, memo=memos[0])
        assert state.due == float("inf")  # the watch bringing an earlier write of ours late: nothing new
        await handlers.search_changed(namespace="ns", name="s", meta={"resourceVersion": "9"}, memo=memos[0])
        assert state.due <= time.monotonic()  # an edit of the resource: at once

    asyncio.run(scenario())


def test_a_pod_that_succeeds_while_others_train_waits_the_settle_and_the_last_one_wakes_at_once():
    """A success of one of several samples is progress (one pass for the burst, after the settle); the last of
    the epoch's pods to succeed, a failure, and a pack's pod (several samples) are decisions: at once."""

    async def scenario() -> None:
        rt = handlers.Runtime(Settings(settle=5.0), None, None, None, None)  # type: ignore[arg-type]
        state = rt.state("ns", "s")
        state.awaiting = {(0, i): f"s3://b/ns/s/uid/epoch-0000/sample-0{i}" for i in range(3)}

        async def pod(sample: str, phase: str, key: str = "amlfs.io/sample") -> None:
            labels = {"amlfs.io/search": "s", "amlfs.io/epoch": "0", key: sample}
            memo = kopf.Memo(amlfs=rt)
            await handlers.pod_changed(
                type="MODIFIED", namespace="ns", labels=labels, meta={}, status={"phase": phase}, memo=memo
            )

        t0 = time.monotonic()
        await pod("0", "Succeeded")
        assert t0 + 5.0 <= state.due <= t0 + 5.1 and state.cause == "pod-succeeded"
        await pod("1", "Succeeded")
        assert t0 + 5.0 <= state.due <= t0 + 5.1  # still one pass for both
        await pod("2", "Succeeded")
        assert state.due <= time.monotonic() and state.cause == "pod-ended"  # the epoch's last: at once
        for sample, phase, key in (("1", "Failed", "amlfs.io/sample"), ("0", "Succeeded", "amlfs.io/pack")):
            state.due, state.poked = float("inf"), set()
            await pod(sample, phase, key)
            assert state.due <= time.monotonic(), (phase, key)

    asyncio.run(scenario())


def test_the_reward_poll_wakes_a_search_for_the_results_its_own_trainers_pushed():
    """At once for the result that completes the epoch, after the settle for one while others still train, once
    for each; never for a push naming another output prefix (a deleted namesake's)."""
    from amlfs.controller.rewards import Snapshot

    mine = [f"s3://b/ns/a/uid-2/epoch-0000/sample-0{i}" for i in (0, 1)]
    pushed: dict[tuple[str, str], dict] = {
        ("ns", "a"): {(0, 0): PushedResult(0.5, False, "ab", output=mine[0])},
        ("ns", "b"): {(0, 0): PushedResult(0.5, False, "ab", output="s3://b/ns/b/epoch-0000/sample-00")},
    }
    reads: list[float] = []

    class Reader:
        def snapshot(self, not_before: float) -> Snapshot:
            reads.append(not_before)
            return Snapshot(not_before, True, {k: dict(v) for k, v in pushed.items()})

    async def scenario() -> None:
        settings = Settings(pushgateway="http://pushgateway:9091", reward_poll=0.02, settle=5.0)
        rt = handlers.Runtime(settings, None, None, Reader(), None)  # type: ignore[arg-type]
        a, b, idle = rt.state("ns", "a"), rt.state("ns", "b"), rt.state("ns", "c")
        a.awaiting = {(0, 0): mine[0], (0, 1): mine[1]}
        b.awaiting = {(0, 0): "s3://b/ns/b/uid-3/epoch-0000/sample-00"}  # its namesake's push: not its own
        poll = asyncio.create_task(handlers.poll_rewards(rt))
        t0 = time.monotonic()
        await asyncio.sleep(0.15)
        assert t0 + 4.9 < a.due < t0 + 5.1 and a.poked == {(0, 0)}  # progress: after the settle
        assert b.due == idle.due == float("inf")
        a.due = float("inf")
        await asyncio.sleep(0.1)
        assert a.due == float("inf")  # the same result wakes it once
        pushed[("ns", "a")][(0, 1)] = PushedResult(0.7, False, "cd", output=mine[1])
        await asyncio.sleep(0.1)
        assert a.due <= time.monotonic() and a.cause == "reward"  # the epoch's last result: at once
        n = len(reads)
        a.awaiting = b.awaiting = {}
        await asyncio.sleep(0.1)
        assert len(reads) <= n + 1  # nothing awaited: no reads
        poll.cancel()

    asyncio.run(scenario())


def test_the_reward_poll_reads_every_period_start_to_start_and_at_most_a_third_of_the_time():
    """The pause after a read makes the next one start a poll period after this one started (a result waits half a
    period on average, not half a period plus the read); a slow read spaces the reads out to a third of the time
    reading; a failed one doubles the pause, from 1 s up to 30 s."""
    assert handlers.poll_pause(0.5, 0.1, True, 0.5) == pytest.approx(0.4)  # start to start: 0.5 s
    assert handlers.poll_pause(0.5, 0.0, True, 0.5) == pytest.approx(0.5)
    assert handlers.poll_pause(0.5, 0.3, True, 0.5) == pytest.approx(0.6)  # 0.3 s of every 0.9 s reading
    assert handlers.poll_pause(0.5, 2.0, True, 0.5) == pytest.approx(4.0)
    assert handlers.poll_pause(0.5, 0.1, False, 0.4) == 1.0
    assert handlers.poll_pause(0.5, 0.1, False, 8.0) == 16.0
    assert handlers.poll_pause(0.5, 0.1, False, 20.0) == 30.0
