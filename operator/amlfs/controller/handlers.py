"""kopf handlers: one async daemon per LossSearch runs reconciliation passes; pod and resource events wake it.

Everything here is async, so no handler holds one of kopf's executor threads: a daemon per search costs a
coroutine, however many searches there are. The blocking part of a pass (Kubernetes API, S3, Pushgateway) runs
in the operator's own worker pool. What the handlers share lives in kopf's `memo` (`memo.amlfs`, a `Runtime`),
made in `@kopf.on.startup` from the settings the entrypoint put in the memo (`memo.config`) and closed in
`@kopf.on.cleanup`:

* the Kubernetes API client, the worker pool, the one Pushgateway reader and the reconciler;
* per search, when its next pass is due, the event that tells its daemon so, and what its last pass learnt.

A pass is due at once when something may need a decision (a pod failed or went, the resource was edited, the last
result of an epoch came in, by push or by its pod's end) and a settle later (`Settings.settle`) when something
only shows progress (a pod started, a result came in or a pod succeeded while others still train): the pods of an
epoch start together and finish together, and one pass for each burst costs the API server one status write
instead of one per pod. A running epoch ends with its rewards, not with its pods: while samples train, one task
reads the Pushgateway every `Settings.reward_poll` seconds for all searches and wakes those whose trainers pushed
a result naming their own output prefix (complete in storage), without waiting for the kubelet to report the pods'
exits.

Pods reach passes through `@kopf.index`: the watch that kopf keeps anyway feeds an in-memory index keyed by
(namespace, search), so a pass lists nothing. The pod watch itself carries a label selector (only trainer pods).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import logging
import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client, config

from amlfs import storage
from amlfs.controller import metrics
from amlfs.controller.pods import LABEL_EPOCH, LABEL_SAMPLE, LABEL_SEARCH
from amlfs.controller.reconcile import GROUP, PLURAL, VERSION, PassResult, Reconciler, Settings
from amlfs.controller.rewards import PushgatewayReader

log = logging.getLogger("amlfs.operator")
PODS = ("v1", "pods")


@dataclass
class SearchState:
    """What the handlers know of one search between its passes."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set when `due` moved (or the daemon stops)
    due: float = math.inf  # when the next pass is due (monotonic)
    cause: str = "first"  # what made it due that early (amlfs_operator_passes_total)
    epoch: int = -1  # its current epoch, as of the last pass
    awaiting: Mapping[tuple[int, int], str] = field(default_factory=dict)  # PassResult.awaiting of the last pass
    poked: set[tuple[int, int]] = field(default_factory=set)  # results (pushed, or a pod that ended) that woke it
    written: str = ""  # resourceVersion of the status the last pass wrote
    # the last versions written here: their echoes wake nothing, even when one arrives after a later write
    echoes: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=8))
    mine: dict[str, Any] | None = None  # the resource as that write returned it
    # the versions from the one this operator's writes started from to the last one written, each written over
    # the one before it (the write names the version it replaces): none of them is anyone else's change
    chain: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=8))
    inflight: asyncio.Future[PassResult] | None = None

    def poke(self, after: float = 0.0, cause: str = "resource") -> None:
        """Have the next pass start within `after` seconds."""
        due = time.monotonic() + after
        if due < self.due:
            self.due, self.cause = due, cause
            self.wake.set()

    def record(self, res: PassResult) -> None:
        """What a pass wrote, or that it met a change of someone else's, for the passes after it."""
        if res.conflict:
            self.mine = None
            self.chain.clear()
        if res.written:
            if not self.chain or self.chain[-1] != res.read:  # it started from a version read afresh
                self.chain.clear()
                self.chain.append(res.read)
            self.chain.append(res.written)
            self.written, self.mine = res.written, res.body
            self.echoes.append(res.written)

    def finished(self, key: tuple[int, int] | None) -> bool:
        """Record that the sample's trainer is done; whether that completes the epoch (or may: an unknown sample,
        one that is not awaited, or none awaited yet)."""
        if key is None or key not in self.awaiting:
            return True
        self.poked.add(key)
        return self.complete()

    def complete(self) -> bool:
        """Whether every awaited sample's result (pushed, or its pod's success) has woken the search."""
        return self.poked >= set(self.awaiting)

    async def sleep(self, stopped: kopf.DaemonStopped) -> None:
        """Until the next pass is due, or the daemon stops."""
        while not stopped:
            left = self.due - time.monotonic()
            if left <= 0:
                return
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=left)


@dataclass
class Runtime:
    """The operator's clients and shared state, kept in kopf's memo."""

    settings: Settings
    api: client.ApiClient
    executor: ThreadPoolExecutor
    rewards: PushgatewayReader
    reconciler: Reconciler
    s3: Any = None
    searches: dict[tuple[str, str], SearchState] = field(default_factory=dict)
    poll: asyncio.Task[None] | None = None  # the reward poll (`poll_rewards`)

    @classmethod
    def create(cls, settings: Settings, api: client.ApiClient | None = None) -> Runtime:
        if api is None:
            cfg = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)
            # a connection for each pass worker and each of their fan-out threads: no "pool is full", no new TLS
            cfg.connection_pool_maxsize = 2 * settings.workers + 4
            api = client.ApiClient(cfg)
        rewards = PushgatewayReader(settings.pushgateway)
        # boto3 makes clients through a session that threads must not share, so the S3 client is made here,
        # before any pass runs; the storage layer then uses it for the whole process
        s3 = None
        try:
            s3 = storage.s3_client()
        except Exception as exc:  # no boto3, or no usable configuration: only file:// storage will work
            log.warning("no S3 client: %s", exc)
        return cls(
            settings=settings,
            api=api,
            executor=ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="amlfs-pass"),
            rewards=rewards,
            reconciler=Reconciler(api, settings, rewards),
            s3=s3,
        )

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.reconciler.close()
        self.api.close()
        if self.s3 is not None:
            self.s3.close()

    def state(self, namespace: str, name: str) -> SearchState:
        return self.searches.setdefault((namespace, name), SearchState())

    def submit(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        """Start blocking `fn(*args)` in the worker pool."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


async def finish(fut: asyncio.Future[Any]) -> Any:
    """Await work started by `Runtime.submit`. A cancelled caller first lets the work end (a pass is never left
    half-done in the background), then is cancelled."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(fut), timeout=60)
        raise


def runtime(memo: Any) -> Runtime:
    rt = memo.get("amlfs")
    if not isinstance(rt, Runtime):
        raise kopf.PermanentError("the operator's runtime is missing from the memo (startup did not run)")
    return rt


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="amlfs.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="amlfs.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Server-side filtering: the pod watch (and its initial list) asks only for trainer pods. kopf's `labels=`
    # filters on the handlers below would only drop the other pods after they were sent and parsed.
    settings.watching.label_selectors[PODS] = LABEL_SEARCH


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure(settings)
    cfg = memo.get("config")
    rt = await asyncio.to_thread(Runtime.create, cfg if isinstance(cfg, Settings) else Settings())
    memo["amlfs"] = rt
    if rt.settings.pushgateway and rt.settings.reward_poll > 0:
        rt.poll = asyncio.create_task(poll_rewards(rt), name="amlfs-reward-poll")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("amlfs")
    if isinstance(rt, Runtime):
        if rt.poll is not None:
            rt.poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rt.poll
        await asyncio.to_thread(rt.close)


def poll_pause(poll: float, took: float, ok: bool, last: float) -> float:
    """Seconds from the end of a reward read to the start of the next: a read every `poll` seconds, start to start
    (a result waits half a period on average, plus the read), but reading at most a third of the time (a read of
    many groups on a busy Pushgateway is slow); after a failed read, twice the last pause (1 to 30 s)."""
    if not ok:
        return min(30.0, max(2 * last, 1.0))
    return max(poll, 3 * took) - took


async def poll_rewards(rt: Runtime) -> None:
    """While any search waits for results, read the Pushgateway every `reward_poll` seconds (one read for all
    searches) and wake each search that has a new result from its own trainers; see `poll_pause`."""
    pause = rt.settings.reward_poll
    while True:
        await asyncio.sleep(pause)
        pause = rt.settings.reward_poll
        waiting = [(key, st) for key, st in rt.searches.items() if st.awaiting]
        if not waiting:
            continue
        t0 = time.monotonic()
        try:
            snap = await asyncio.to_thread(rt.rewards.snapshot, t0)
        except Exception:  # never end the poll: passes still read on pod events
            log.exception("reward poll failed")
            continue
        pause = poll_pause(rt.settings.reward_poll, time.monotonic() - t0, snap.ok, pause)
        for key, st in waiting:
            pushed = snap.searches.get(key, {})
            done = {k for k, output in st.awaiting.items() if (got := pushed.get(k)) is not None and got.wrote(output)}
            if done - st.poked:
                st.poked |= done
                # the last result closes the epoch: at once; the others are progress, shown after the settle
                st.poke(0.0 if st.complete() else rt.settings.settle, "reward")


@kopf.index(*PODS, labels={LABEL_SEARCH: kopf.PRESENT})
async def trainer_pods(
    namespace: str | None, name: str, labels: Mapping[str, str], meta: Mapping[str, Any], status: Any, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """Trainer pods by (namespace, search), as the plain dicts the reconciler reads (only what it reads)."""
    pod = {
        "metadata": {
            "name": name,
            "labels": dict(labels),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "creationTimestamp": meta.get("creationTimestamp"),
            "ownerReferences": [{"uid": o.get("uid")} for o in meta.get("ownerReferences") or []],
        },
        "status": _plain(status),
    }
    return {(namespace or "", labels[LABEL_SEARCH]): pod}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def known_body(state: SearchState, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The resource for the next pass without a fresh read, or None (read it). kopf keeps `body` up to date from
    the watch: when it is the version our last pass wrote, that is it; when it is a version our writes replaced
    (the watch has not brought them all yet, as under load: it may lag several writes), it is the resource as the
    last write returned it. Any other version is someone else's change: read afresh, as after a conflict. A
    pass that acts on a resource changed meanwhile is refused at its status write (resourceVersion), which
    drops what is held here."""
    if not state.written or state.mine is None:
        return None
    rv = body.get("metadata", {}).get("resourceVersion")
    if rv == state.written:
        return _plain(body)
    if rv in state.chain:
        return copy.deepcopy(state.mine)
    return None


def search_pods(
    index: kopf.Index[tuple[str, str], dict[str, Any]], namespace: str, name: str
) -> dict[str, dict[str, Any]]:
    """The search's pods, those being deleted included (their trainers may still write), copied out of the index
    so that a pass may read them in a thread."""
    store = index.get((namespace, name))
    if not store:
        return {}
    return {p["metadata"]["name"]: p for p in store}


# Stopping (deletion, operator exit) sets `stopped`, which wakes the loop: it exits after the pass in progress, if
# any. Only a pass hung for longer than the backoff is cancelled.
@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_backoff=10.0, cancellation_timeout=60.0)
async def search_daemon(
    stopped: kopf.DaemonStopped,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    trainer_pods: kopf.Index[tuple[str, str], dict[str, Any]] | None = None,  # kopf passes the index by name
    **_: Any,
) -> None:
    """Level-based loop: reconcile, then sleep until woken by an event or the next pass is due."""
    assert namespace is not None  # LossSearch is namespaced
    assert trainer_pods is not None
    rt = runtime(memo)
    state = rt.state(namespace, name)
    if state.inflight is not None:  # a pass of an earlier daemon of this search is still running
        await asyncio.wait([state.inflight])
    first = True

    async def relay_stop() -> None:
        await stopped.wait()
        state.wake.set()

    relay = asyncio.create_task(relay_stop())
    try:
        while not stopped:
            metrics.PASSES.labels(state.cause).inc()
            due_at = state.due if math.isfinite(state.due) else None
            state.due = math.inf  # events from here on are news to this pass or the next
            seen_at = time.monotonic()
            pods = search_pods(trainer_pods, namespace, name)
            known = known_body(state, body)
            state.inflight = rt.submit(rt.reconciler.reconcile, namespace, name, pods, seen_at, first, known, due_at)
            try:
                res = await finish(state.inflight)
            except Exception:  # one bad pass must not kill the daemon; the next one re-derives everything
                log.exception("reconcile of %s/%s failed", namespace, name)
                res = PassResult(rt.settings.interval)
            first = False
            if res.epoch >= 0:
                state.epoch = res.epoch
            state.awaiting = res.awaiting
            state.poked &= set(res.awaiting)  # keys carry the epoch: a new epoch's are all new
            state.record(res)
            state.poke(res.delay, "conflict" if res.conflict else "timer")
            await state.sleep(stopped)
    finally:
        relay.cancel()
        if rt.searches.get((namespace, name)) is state and (state.inflight is None or state.inflight.done()):
            del rt.searches[(namespace, name)]


@kopf.on.event(GROUP, VERSION, PLURAL)
async def search_changed(namespace: str | None, name: str, meta: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
    state = runtime(memo).searches.get((namespace or "", name))
    if state is not None and meta.get("resourceVersion") not in state.echoes:  # not the echo of a status we wrote
        state.poke(0.0, "resource")


@kopf.on.event(*PODS, labels={LABEL_SEARCH: kopf.PRESENT})
async def pod_changed(
    type: str | None,
    namespace: str | None,
    labels: Mapping[str, str],
    meta: Mapping[str, Any],
    status: Mapping[str, Any],
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Wake the pod's search when what a pass reads of the pod changed: its phase, its deletion, its removal.
    Pods of closed epochs (being deleted) wake nothing. `memo` is this pod's own copy of the operator's memo."""
    rt = runtime(memo)
    state = rt.searches.get((namespace or "", labels.get(LABEL_SEARCH, "")))
    if state is None:
        return
    with contextlib.suppress(ValueError):
        if int(labels.get(LABEL_EPOCH, "-1")) < state.epoch:
            return
    seen = "Deleting" if meta.get("deletionTimestamp") else str(status.get("phase") or "Pending")
    if type == "DELETED" or memo.get("amlfs_seen", "Pending") != seen:
        memo["amlfs_seen"] = seen
        # a pod that failed or went may need a decision: at once; so does the last of an epoch's pods to succeed.
        # One that started is progress, and the pods of an epoch start together: one pass for all of them, after
        # the settle; so is one that succeeded while others train. So is one being deleted: it counts as running
        # until it is gone (and the pods of an epoch that closed are deleted before the pass that closed it has
        # returned: their events would each make a pass)
        if type != "DELETED" and seen in ("Pending", "Running", "Deleting"):
            state.poke(rt.settings.settle, "pod-started" if seen != "Deleting" else "pod-deleting")
        elif type != "DELETED" and seen == "Succeeded" and not state.finished(_sample_key(labels)):
            # one of several samples succeeded, the others still train: progress, like a result pushed early
            state.poke(rt.settings.settle, "pod-succeeded")
        else:
            state.poke(0.0, "pod-ended")


def _sample_key(labels: Mapping[str, str]) -> tuple[int, int] | None:
    """(epoch, sample) of a one-sample pod; None for a pack's pod (several samples) or unreadable labels."""
    try:
        return int(labels[LABEL_EPOCH]), int(labels[LABEL_SAMPLE])
    except (KeyError, ValueError):
        return None


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def search_deleted(
    namespace: str | None, name: str, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo, **_: Any
) -> None:
    """Drop the search's Pushgateway groups and metric series; with storage.deleteOnDelete, also its objects in
    storage (its pods go by ownerReference)."""
    assert namespace is not None
    rt = runtime(memo)
    state = rt.searches.get((namespace, name))
    if state is not None and state.inflight is not None:
        await asyncio.wait([state.inflight])  # no pass writes after the cleanup
    await finish(rt.submit(rt.reconciler.forget, namespace, name, {"spec": _plain(spec), "status": _plain(status)}))
