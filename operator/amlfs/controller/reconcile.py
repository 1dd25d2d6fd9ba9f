"""One level-based reconciliation pass of a LossSearch: a thin shell around `amlfs.core.step`.

Everything is re-derived from the resource's status and the cluster each pass, so a missed event or an
operator restart changes nothing:

1. read the LossSearch (fresh, with its resourceVersion; or as the caller has it, when that is the version the last
   pass wrote); the search's pods come from the caller (the operator's watch-fed index), as they were when the
   pass began;
2. turn pods, pushed rewards and result.json files into observations;
3. `core.step` decides the new status and the actions;
4. apply the storage actions (idempotent server-side copies and writes);
5. patch the status with the resourceVersion read in 1, unless it is unchanged (a conflict aborts the pass:
   nothing was started, or what was is taken back, see 6);
6. create the pods of StartSample actions ("already exists" is success; the pass that starts an epoch creates
   them during 5, and deletes them when 5 fails), delete pods of closed epochs and the Pushgateway groups of
   closed epochs and finished searches, post events, update metrics.

A pod created by an earlier pass may be missing from the index for a moment: its sample is then still Pending
in the status, so the pass would only ask for it again ("already exists" is success; a pod created or deleted in
the last half minute is not asked for twice). A sample is Running only once its pod was seen, so a Running sample
without a pod really lost it. The status a pass starts from is never older than the last one written, so a pass
never acts on an epoch that is already closed.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from amlfs import core, effects, storage
from amlfs.contract import EXIT_CONFIG, EXIT_TRANSIENT
from amlfs.controller import metrics
from amlfs.controller.pods import (
    LABEL_EPOCH,
    LABEL_PACK,
    LABEL_SAMPLE,
    PodSettings,
    action_pod_name,
    packs,
    pod_name,
    trainer_pod,
)
from amlfs.controller.rewards import PushedResult, PushgatewayReader
from amlfs.spec import LossSearchSpec, explain
from amlfs.status import LossSearchStatus, SampleStatus, only_progress

GROUP, VERSION, PLURAL, KIND = "amlfs.io", "v1alpha1", "losssearches", "LossSearch"
FINISHED = ("Succeeded", "Failed")
IDLE_RESYNC = 60.0  # seconds between passes of a finished search (spec edits wake it at once)
RECENT = 30.0  # seconds during which a pod created or deleted is not asked for again
REVOKED = 600.0  # seconds a pod taken back is known as such (Reconciler.revoked)
# Waiting reasons of a pod that will not start by itself; ContainerCreating and the like are a normal start.
STUCK = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "Unschedulable",
)
log = logging.getLogger("amlfs.operator")
T = TypeVar("T")


@dataclass
class Settings:
    pushgateway: str = ""  # URL the operator reads rewards from
    pod_pushgateway: str = ""  # URL trainer pods push to (default: the same)
    default_storage: str = ""  # storage root when a spec names none (s3://bucket/prefix)
    pod_s3_endpoint: str = ""  # S3 endpoint for pods when the spec names none
    reward_timeout: float = 30.0  # seconds after a pod succeeded before falling back to result.json
    interval: float = 5.0  # seconds between passes when nothing wakes the search
    workers: int = 16  # passes running at once (threads); each pass is mostly waiting on the network
    run_as_user: int | None = 1000  # uid/gid/fsGroup of trainer pods; None: the platform assigns them
    group_ttl: float = 120.0  # seconds a closed epoch's Pushgateway groups stay, so that Prometheus scrapes them
    retry_backoff: float = 5.0  # seconds before the first retry of a failed pod; doubles per retry, with jitter
    retry_backoff_max: float = 300.0
    reward_poll: float = 0.5  # seconds between Pushgateway reads while samples train (0: read on pod events only)
    settle: float = 1.0  # seconds progress (a pod started, a result while others train) waits for its pass
    # seconds between status writes that only show progress (samples started, or finished while others train);
    # decisions (an epoch closed or started, a failure, a retry, an edit) are written at once
    progress: float = 5.0

    def pods(self) -> PodSettings:
        return PodSettings(
            pushgateway=self.pod_pushgateway or self.pushgateway,
            s3_endpoint=self.pod_s3_endpoint,
            run_as_user=self.run_as_user,
        )


def epoch_event(
    completed: Mapping[str, Any] | None, promoted: list[core.Promote], started: LossSearchStatus | None
) -> tuple[str, str, str] | None:
    """One event for what a pass did to the epochs: the epoch it closed (its history record), where its best
    checkpoint went, and the epoch it started. One per epoch, rather than one for each, because events are
    requests to the API server like any other, and `kubectl describe` reads better with one line per epoch.
    Its reason is the biggest of these steps: EpochCompleted, else Promoted, else EpochStarted."""
    parts = []
    if completed is not None:
        r = completed
        parts.append(
            f"epoch {r['epoch']}: best reward {r['bestReward']:.4f} (sample {r['best']}), mean {r['meanReward']:.4f}"
        )
    parts += [f"epoch {a.epoch} sample {a.sample} promoted to {', '.join(a.targets)}" for a in promoted]
    if started is not None:
        parts.append(f"epoch {started.epoch} started: {len(started.samples)} samples")
    if not parts:
        return None
    reason = "EpochCompleted" if completed is not None else "Promoted" if promoted else "EpochStarted"
    return ("Normal", reason, "; ".join(parts))


def _version(body: Mapping[str, Any]) -> str:
    return str(body.get("metadata", {}).get("resourceVersion", ""))


class Stages:
    """How long each stage of a pass took (seconds), as `mark` closes them one after another; `due`: when the pass
    was due (Unix time, to compare with when results were pushed)."""

    def __init__(self, due: float | None = None) -> None:
        self.at = time.perf_counter()
        self.due = time.time() if due is None else due
        self.took: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.took[stage] = self.took.get(stage, 0.0) + now - self.at
        self.at = now


class Conflict(Exception):
    """The resource changed while we reconciled; the pass is redone."""


@dataclass
class Pass:
    namespace: str
    name: str
    body: dict[str, Any]
    spec: LossSearchSpec
    old: LossSearchStatus | None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    seen_at: float | None = None  # when the pods were read (monotonic): rewards are read from no earlier
    written: dict[str, Any] | None = None  # the resource as the status write of this pass returned it
    doomed: list[str] = field(default_factory=list)  # pods given up on (never started): deleted after the status
    retry_in: float = math.inf  # seconds until a retry held back by its backoff is due
    stages: Stages = field(default_factory=Stages)
    last_pushed: float | None = None  # when the latest result this pass observed was pushed (Unix time)
    completed: dict[str, Any] | None = None  # the history record of the epoch this pass closed
    promoted: list[core.Promote] = field(default_factory=list)  # the promotions this pass made


@dataclass(frozen=True)
class PassResult:
    delay: float  # seconds until the next pass is due (earlier if something wakes the search)
    epoch: int = -1  # the search's current epoch: events of pods of earlier epochs need not wake it
    written: str = ""  # resourceVersion of the status this pass wrote ("" when it wrote none)
    body: dict[str, Any] | None = None  # the resource as that write returned it
    read: str = ""  # the resourceVersion the pass read, and wrote over
    conflict: bool = False  # the resource had changed since it was read: what the caller holds of it is stale
    # the samples whose results the search waits for, (epoch, sample) -> the output prefix their trainer pushes
    awaiting: Mapping[tuple[int, int], str] = field(default_factory=dict)

    @classmethod
    def after(
        cls,
        delay: float,
        epoch: int,
        read: str,
        got: dict[str, Any] | None,
        awaiting: Mapping[tuple[int, int], str] | None = None,
    ) -> PassResult:
        """The result of a pass that read `read` and wrote `got` (None: wrote nothing)."""
        if got is None:
            return cls(delay, epoch, awaiting=awaiting or {})
        rv = _version(got)
        return cls(delay, epoch, rv, got if rv else None, read, awaiting=awaiting or {})


class Recent:
    """Requests made in the last `ttl` seconds (thread-safe), so that a pass reading a slightly old index does not
    repeat them."""

    def __init__(self, ttl: float = RECENT, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self._at: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def within(self, key: tuple[str, ...]) -> bool:
        with self._lock:
            at = self._at.get(key)
            return at is not None and self.clock() - at < self.ttl

    def add(self, key: tuple[str, ...]) -> None:
        now = self.clock()
        with self._lock:
            self._at[key] = now
            if len(self._at) > 1024:
                self._at = {k: t for k, t in self._at.items() if now - t < self.ttl}

    def claim(self, key: tuple[str, ...]) -> bool:
        """Record the request unless it was made in the last `ttl` seconds; whether the caller should make it."""
        now = self.clock()
        with self._lock:
            at = self._at.get(key)
            if at is not None and now - at < self.ttl:
                return False
            self._at[key] = now
            return True

    def discard(self, key: tuple[str, ...]) -> None:
        with self._lock:
            self._at.pop(key, None)


class Reconciler:
    """Passes over LossSearches; one instance serves every search, from several threads at once."""

    def __init__(
        self,
        api: client.ApiClient,
        settings: Settings,
        rewards: PushgatewayReader | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.settings = settings
        self.rewards = rewards if rewards is not None else PushgatewayReader(settings.pushgateway)
        self.clock = clock
        self.started = time.monotonic()
        self.recent = Recent()
        # pods taken back (created by a pass whose status write then failed), by (namespace, name), until they are
        # gone and their name is made again; long enough for a running trainer's grace period
        self.revoked = Recent(ttl=REVOKED)
        # when each epoch closed (or its search ended), by (namespace, search, epoch): its Pushgateway groups are
        # deleted group_ttl after that; epochs closed before this process started count from its start
        self.closed_at: dict[tuple[str, str, int], float] = {}
        self.wrote_at: dict[tuple[str, str], float] = {}  # when each search's status was last written (clock)
        self.born = clock()
        self._closed_lock = threading.Lock()
        # the independent requests of one pass (copies, pod creations) go out together
        self.fanout = ThreadPoolExecutor(max_workers=max(4, settings.workers), thread_name_prefix="amlfs-io")
        # What follows a pass and decides nothing (deleting the pods and Pushgateway groups of closed epochs,
        # posting events) runs here, after the pass has returned its worker: at scale, passes waiting on other
        # searches' cleanups in `fanout` delayed the pod creations that start epochs. All of it is idempotent,
        # and a later pass asks again for what failed.
        self.background = ThreadPoolExecutor(max_workers=max(2, settings.workers // 2), thread_name_prefix="amlfs-bg")
        self._behind: set[Future[None]] = set()
        self._behind_lock = threading.Lock()

    def close(self) -> None:
        self.fanout.shutdown(wait=False, cancel_futures=True)
        self.background.shutdown(wait=False, cancel_futures=True)

    def _later(self, fns: Iterable[Callable[[], object]]) -> None:
        """Start the calls in the background; failures are logged (the next pass asks again)."""
        for fn in fns:
            fut = self.background.submit(contextvars.copy_context().run, _logged, fn)
            with self._behind_lock:
                self._behind.add(fut)
            fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        with self._behind_lock:
            self._behind.discard(fut)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the background work started so far."""
        with self._behind_lock:
            pending = list(self._behind)
        futures.wait(pending, timeout=timeout)

    def _each(self, fns: Iterable[Callable[[], T]]) -> list[T]:
        """Run the calls concurrently and wait for all of them: their results; the first failure is raised."""
        return _results(self._submit(fns))

    def _submit(self, fns: Iterable[Callable[[], T]]) -> list[Future[T]]:
        """Start the calls concurrently (in this thread's context: the S3 endpoint too)."""
        return [self.fanout.submit(contextvars.copy_context().run, fn) for fn in fns]

    # --- the pass -----------------------------------------------------------------------------

    def reconcile(
        self,
        namespace: str,
        name: str,
        pods: Mapping[str, dict],
        seen_at: float | None = None,
        first: bool = False,
        known: dict[str, Any] | None = None,
        due_at: float | None = None,
    ) -> PassResult:
        """One pass over the search, given its pods (name -> pod as a dict, none being deleted) as seen at
        `seen_at` (monotonic). `first`: the first pass since the operator took the search on, which also clears
        leftovers of an earlier operator process. `known`: the resource as the caller has it, used instead of a
        fresh read; only ever the version the last pass wrote. `due_at` (monotonic): when the pass was due, for
        the handoff metrics."""
        t0 = time.perf_counter()
        now = time.monotonic()
        due = due_at if due_at is not None else seen_at if seen_at is not None else now
        stages = Stages(time.time() - (now - due))
        if seen_at is not None:
            stages.took["queue"] = wait = max(0.0, now - seen_at)
            stages.took["due"] = max(0.0, seen_at - due)
            metrics.PASS_WAIT_SECONDS.observe(wait)
        try:
            return self._reconcile(namespace, name, pods, now if seen_at is None else seen_at, first, known, stages)
        except Conflict:
            return PassResult(0.0, conflict=True)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)

    def _reconcile(
        self,
        namespace: str,
        name: str,
        pods: Mapping[str, dict],
        seen_at: float,
        first: bool,
        known: dict[str, Any] | None,
        stages: Stages,
    ) -> PassResult:
        try:
            body = known or self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return PassResult(self.settings.interval)
            raise
        if body["metadata"].get("deletionTimestamp"):
            return PassResult(self.settings.interval)
        # What the operator cannot work with degrades the search without ending it: fixed, it goes on.
        try:
            spec = LossSearchSpec.model_validate(body.get("spec") or {})
        except ValueError as exc:
            msg = explain(exc, "spec") if isinstance(exc, ValidationError) else str(exc)
            return PassResult.after(self.settings.interval, -1, _version(body), self._degrade(body, "InvalidSpec", msg))
        raw = body.get("status") or {}
        old = LossSearchStatus.model_validate(raw) if raw.get("mu") else None
        p = Pass(namespace, name, body, core.spec_as_begun(spec, old), old, seen_at=seen_at, stages=stages)
        stages.mark("read")
        # the operator's own S3 calls for this search (results, promotions, history) go where its pods write:
        # spec.storage.endpoint when set, with the operator's credentials
        with storage.using_endpoint(spec.storage.endpoint):
            return self._pass(p, pods, first)

    def _pass(self, p: Pass, pods: Mapping[str, dict], first: bool) -> PassResult:
        body, spec, old = p.body, p.spec, p.old
        root = self.root(p)
        if root is None:
            msg = "spec.storage.uri: empty and the operator has no default storage; set spec.storage.uri"
            return PassResult.after(self.settings.interval, -1, _version(body), self._degrade(body, "NoStorage", msg))
        if old is not None and old.reason in ("InvalidSpec", "NoStorage", "StorageError"):
            old.reason, old.message = "", ""
        uid = body["metadata"].get("uid", "")
        pods = {n: pod for n, pod in pods.items() if _owned_by(pod, uid)}  # not a deleted namesake's leftovers
        obs, pending_reward = self.observe(p, pods, root)
        new, actions = core.step(spec, old, obs, root)
        new.storage_root = root
        p.stages.mark("observe")
        try:
            self._each(functools.partial(effects.apply_storage, a) for a in _storage_parts(actions))
        except (storage.StorageError, OSError) as exc:  # nothing advanced: the next pass redoes all of it
            msg = f"storage at {root}: {exc}"[:1000]
            self.event(body, "Warning", "StorageError", msg)
            return PassResult.after(
                self.settings.interval, -1, _version(body), self._degrade(body, "StorageError", msg)
            )
        p.stages.mark("storage")
        for a in actions:
            if not isinstance(a, core.StartSample):
                self._apply(p, a)
        due = self._due(p, actions, pods)
        # The pass that starts the next epoch creates its pods while it writes the status that records them: the
        # two are the longest requests of the handoff, and the search's GPUs wait for both. A write that fails
        # (a conflict: someone changed the resource since it was read) takes back the pods it made, so that no pod
        # trains a decision the status never recorded (the pass redone may decide otherwise: a spec edit).
        handoff = old is not None and new.epoch > old.epoch and bool(due)
        creating = self._creations(p, due) if handoff else []
        held = 0.0 if handoff or first else self._held(p, new)
        if held:  # a pass comes to write it then, unless a decision writes it first
            p.retry_in = min(p.retry_in, held)
        else:
            try:
                p.written = self._patch_status(body, new.to_json_dict(), self._conditions(spec, new), old)
            except BaseException:
                self._revoke(p, creating)
                raise
        p.stages.mark("status")
        if first and old is not None and self.settings.pushgateway:
            self.rewards.snapshot(self.started)  # leftover groups of an earlier operator process
        self._after_status(p, new, pods, first or bool(held), creating if handoff else self._creations(p, due))
        if new.phase == "Running" and pending_reward:
            delay = min(self.settings.interval, 1.0)
        elif new.phase in FINISHED:
            delay = max(self.settings.interval, IDLE_RESYNC)
        else:
            delay = self.settings.interval
        awaiting: dict[tuple[int, int], str] = {}
        if new.phase == "Running" and self.settings.pushgateway:
            layout = core.Layout(root)
            awaiting = {
                (new.epoch, x.index): layout.sample_dir(new.epoch, x.index)
                for x in new.samples
                if x.state in ("Pending", "Running")
            }
        return PassResult.after(max(0.1, min(delay, p.retry_in)), new.epoch, _version(body), p.written, awaiting)

    def _held(self, p: Pass, new: LossSearchStatus) -> float:
        """Seconds a status that only shows progress (`only_progress`) waits to be written: `Settings.progress`
        after the search's last status write. With short epochs, most of that progress is then written with the
        decision that closes the epoch, in one write instead of one per burst: each write of this resource is one
        of the API server's dearest requests (the whole object validated, stored and sent to every watch), and
        an in-flight progress write delays the pass that starts the next epoch."""
        if self.settings.progress <= 0 or p.old is None or not only_progress(p.old, new):
            return 0.0
        if (p.body.get("status") or {}).get("observedGeneration") != p.body["metadata"].get("generation"):
            return 0.0  # an edit is acknowledged at once
        last = self.wrote_at.get((p.namespace, p.name))
        return 0.0 if last is None else max(0.0, last + self.settings.progress - self.clock())

    def _degrade(self, body: dict, reason: str, msg: str) -> dict[str, Any] | None:
        """Report a problem of the operator's side (spec, configuration) in the status, keeping the search."""
        status = dict(body.get("status") or {}) | {"reason": reason, "message": msg}
        status.pop("conditions", None)
        status.setdefault("phase", "Pending")
        conds = [
            ("Ready", "False", reason, msg),
            ("Progressing", "False", reason, msg),
            ("Degraded", "True", reason, msg),
        ]
        return self._patch_status(body, status, conds)

    def forget(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """A deleted search: drop its Pushgateway groups and its metric series; with storage.deleteOnDelete,
        also its objects in storage (its pods go by ownerReference)."""
        self.wrote_at.pop((namespace, name), None)
        spec: LossSearchSpec | None
        try:
            spec = LossSearchSpec.model_validate(dict(body.get("spec") or {}))
        except ValueError:
            spec = None
        status = dict(body.get("status") or {})
        groups = set(self.rewards.results(namespace, name))
        groups |= {(int(status.get("epoch", 0)), int(x.get("index", 0))) for x in status.get("samples") or []}
        self._each(functools.partial(self.rewards.delete, namespace, name, e, s) for e, s in sorted(groups))
        if spec is not None:
            metrics.forget(namespace, name, spec)
            base = spec.storage.uri or self.settings.default_storage
            root = status.get("storageRoot") or (storage.join(base, namespace, name) if base else "")
            if spec.storage.delete_on_delete and root:
                with storage.using_endpoint(spec.storage.endpoint):
                    n = storage.delete_prefix(root)
                log.info("deleted %d objects of %s/%s under %s", n, namespace, name, root)

    def root(self, p: Pass) -> str | None:
        """The search's storage root: as recorded in its status; for a new search, below its UID (a deleted and
        re-created namesake never meets the old one's objects)."""
        if p.old is not None and p.old.storage_root:
            return p.old.storage_root
        base = p.spec.storage.uri or self.settings.default_storage
        if not base:
            return None
        legacy = storage.normalize(storage.join(base, p.namespace, p.name))
        uid = p.body["metadata"].get("uid", "")
        return legacy if p.old is not None or not uid else storage.normalize(storage.join(legacy, uid))

    # --- observations -------------------------------------------------------------------------

    def observe(self, p: Pass, pods: Mapping[str, dict], root: str) -> tuple[list[core.Observation], bool]:
        st = p.old
        if st is None or not st.samples:
            return [], False
        layout = core.Layout(root)
        pushed: dict[tuple[int, int], PushedResult] | None = None
        cached: dict[tuple[int, int], PushedResult] | None = None

        def observation(x: SampleStatus, got: PushedResult) -> core.Observation:
            outcome: core.Outcome = "no-reward" if got.diverged else "succeeded"
            if got.pushed_at is not None:
                p.last_pushed = max(p.last_pushed or 0.0, got.pushed_at)
            return core.Observation(
                st.epoch, x.index, outcome, x.attempt, reward=got.reward, sha256=got.sha256, val_loss=got.val_loss
            )

        def pushed_result(x: SampleStatus) -> core.Observation | None:
            nonlocal pushed
            if pushed is None:
                pushed = self.rewards.results(p.namespace, p.name, not_before=p.seen_at)
            got = pushed.get((st.epoch, x.index))
            return None if got is None else observation(x, got)

        def written(x: SampleStatus) -> core.Observation | None:
            """The result its trainer pushed after writing it to this sample's own output prefix: complete in
            storage, whatever its pod's phase says yet (the kubelet reports the exit later). From the latest
            snapshot, which the reward poll keeps fresh; nothing is fetched for it."""
            nonlocal cached
            if cached is None:
                cached = self.rewards.cached(p.namespace, p.name)
            got = cached.get((st.epoch, x.index))
            return observation(x, got) if got is not None and got.wrote(layout.sample_dir(st.epoch, x.index)) else None

        obs: list[core.Observation] = []
        waiting = False
        for x in st.samples:
            if x.state in ("Succeeded", "NoReward", "Failed", "ConfigError"):
                continue
            if (done := written(x)) is not None:
                obs.append(done)
                continue
            name = pod_name(p.name, st.epoch, x.index, x.attempt, x.restarts, x.pack)
            pod = None if self.revoked.within((p.namespace, name)) else pods.get(name)  # taken back: not its pod
            if pod is None:
                if x.state == "Running":
                    done = effects.read_result(root, st.epoch, x.index, x.attempt, x.theta)
                    obs.append(done or core.Observation(st.epoch, x.index, "absent", x.attempt))
                continue
            phase = (pod.get("status") or {}).get("phase", "Pending")
            if phase in ("Pending", "Running", "Unknown"):
                obs.append(self._alive(p, st.epoch, x, pod, phase))
            elif phase == "Succeeded":
                got = pushed_result(x)
                if got is not None:
                    obs.append(got)
                elif self.clock() - _finished_at(pod) >= self.settings.reward_timeout:
                    done = effects.read_result(root, st.epoch, x.index, x.attempt, x.theta)
                    if done is not None:
                        p.events.append(
                            (
                                "Warning",
                                "RewardFromStorage",
                                f"epoch {st.epoch} sample {x.index}: no reward on the Pushgateway after "
                                f"{self.settings.reward_timeout:.0f}s; used result.json",
                            )
                        )
                        obs.append(done)
                    else:
                        obs.append(
                            core.Observation(
                                st.epoch, x.index, "failed", x.attempt, message="pod succeeded but left no result"
                            )
                        )
                else:
                    waiting = True
                    obs.append(core.Observation(st.epoch, x.index, "running", x.attempt))
            else:
                # a pod that failed or was evicted may have finished some of its members (a pack trains them one
                # after another on a CPU; a transient exit follows finished members): those are kept, never retrained
                done = pushed_result(x) or effects.read_result(root, st.epoch, x.index, x.attempt, x.theta)
                obs.append(done if done is not None else self._failed(p, st.epoch, x, pod))
        return obs, waiting

    def _alive(self, p: Pass, epoch: int, x: SampleStatus, pod: dict, phase: str) -> core.Observation:
        """A pod that has not ended: running, or waiting to start (stuck: say why; too long: give up on it). A pod
        being deleted counts as running until it is gone, so that no new trainer writes beside it."""
        if phase != "Pending" or pod["metadata"].get("deletionTimestamp"):
            return core.Observation(epoch, x.index, "running", x.attempt)
        reason, message = _waiting(pod)
        timeout = p.spec.trainer.start_timeout_seconds
        if timeout and reason != "SchedulingGated" and self.clock() - _created_at(pod) >= timeout:
            p.doomed.append(pod["metadata"]["name"])
            metrics.PODS_FAILED.labels(p.namespace, p.name, "not-started").inc()
            why = f"{reason}: {message}" if reason else "Pending"
            return core.Observation(
                epoch, x.index, "failed", x.attempt, message=f"not started after {timeout}s: {why}"[:500]
            )
        stuck = f"waiting: {reason}: {message}"[:500] if reason in STUCK else ""
        return core.Observation(epoch, x.index, "running", x.attempt, message=stuck)

    def _failed(self, p: Pass, epoch: int, x: SampleStatus, pod: dict) -> core.Observation:
        status = pod.get("status") or {}
        reason = status.get("reason", "")
        term = _terminated(pod)
        code = term.get("exitCode")
        msg = (term.get("message") or status.get("message") or reason or f"exit code {code}").strip()[-500:]
        if _preempted(pod):
            metrics.PODS_FAILED.labels(p.namespace, p.name, "preempted").inc()
            return core.Observation(epoch, x.index, "preempted", x.attempt, message=msg)
        if code == EXIT_CONFIG:
            metrics.PODS_FAILED.labels(p.namespace, p.name, "config").inc()
            return core.Observation(epoch, x.index, "config-error", x.attempt, message=msg)
        if code == EXIT_TRANSIENT:  # storage unreachable: the platform's failure, not the sample's
            metrics.PODS_FAILED.labels(p.namespace, p.name, "transient").inc()
            return core.Observation(epoch, x.index, "preempted", x.attempt, message=f"transient: {msg}")
        kind = reason if reason in metrics.FAILURE_REASONS else "error"
        metrics.PODS_FAILED.labels(p.namespace, p.name, kind).inc()
        return core.Observation(epoch, x.index, "failed", x.attempt, message=msg)

    # --- actions ------------------------------------------------------------------------------

    def _apply(self, p: Pass, a: core.Action) -> None:
        """What an action means besides its storage effect (already applied): events and metrics."""
        if isinstance(a, core.Promote):
            p.promoted.append(a)
        elif isinstance(a, core.AppendHistory):
            p.completed = a.record
            metrics.EPOCHS.labels(namespace=p.namespace, search=p.name).inc()
        elif isinstance(a, core.Finished):
            p.events.append(("Normal" if a.phase == "Succeeded" else "Warning", f"Search{a.phase}", a.message))

    def _after_status(
        self,
        p: Pass,
        new: LossSearchStatus,
        pods: Mapping[str, dict],
        shown: bool,
        creating: list[Future[tuple[str, str]]],
    ) -> None:
        """Wait for the pod creations started (`_creations`), then start the cleanup of closed epochs and post the
        events, in the background. `shown`: export the status to the metrics even when it was not written (the
        first pass; progress held back)."""
        old = p.old
        started = bool(new.samples) and (old is None or old.epoch != new.epoch or not old.samples)
        told = epoch_event(p.completed, p.promoted, new if started else None)
        if told is not None:
            p.events.insert(0, told)
        if old is not None and old.epoch == new.epoch:
            before = {x.index: x for x in old.samples}
            for x in new.samples:
                b = before.get(x.index)
                if b is not None and x.attempt > b.attempt:
                    p.events.append(("Warning", "SampleRetried", f"epoch {new.epoch} sample {x.index}: {x.message}"))
                if b is not None and x.state in ("Failed", "ConfigError") and b.state != x.state:
                    p.events.append(("Warning", f"Sample{x.state}", f"epoch {new.epoch} sample {x.index}: {x.message}"))
        if creating:
            outcomes = [outcome for _, outcome in _results(creating)]
            if "blocked" in outcomes:  # its name still taken by a pod taken back: once it is gone
                p.retry_in = min(p.retry_in, 1.0)
            if old is not None and new.epoch > old.epoch:  # the next epoch's pods exist: the handoff is over
                p.stages.mark("pods")
                _observe_handoff(p.stages, p.last_pushed)
        # then, all at once: the Pushgateway groups and pods of closed epochs, the events
        cleanup: list[Callable[[], object]] = []
        if self.settings.pushgateway:
            cleanup += [
                functools.partial(self.rewards.delete, p.namespace, p.name, e, s)
                for e, s in self._closed_groups(p, new)
            ]
        for pname, pod in pods.items():
            if pod["metadata"].get("deletionTimestamp"):
                continue
            epoch = int(pod["metadata"].get("labels", {}).get(LABEL_EPOCH, "-1"))
            taken_back = self.revoked.within((p.namespace, pname))  # its delete failed, or has not been asked for
            if epoch < new.epoch or new.phase == "Succeeded" or pname in p.doomed or taken_back:
                cleanup.append(functools.partial(self._delete_pod, p.namespace, pname))
        cleanup += [functools.partial(self.event, p.body, *e) for e in p.events]
        self._later(cleanup)
        if p.written or shown:
            metrics.observe_status(p.namespace, p.name, new, p.spec)

    def _closed_groups(self, p: Pass, new: LossSearchStatus) -> list[tuple[int, int]]:
        """The Pushgateway groups to delete: those of closed epochs (of a finished search: all) once they have been
        there `group_ttl` seconds since their epoch closed, long enough for Prometheus to scrape them for the
        dashboards; also leftovers of a crash still in the latest snapshot. Sets `p.retry_in` so that a pass
        comes when the next of them is due."""
        old, done, now, ttl = p.old, new.phase in FINISHED, self.clock(), self.settings.group_ttl
        groups = set(self.rewards.cached(p.namespace, p.name))
        with self._closed_lock:
            if old is not None and (new.epoch != old.epoch or (done and old.phase not in FINISHED)):
                self.closed_at.setdefault((p.namespace, p.name, old.epoch), now)
                groups |= {(old.epoch, x.index) for x in old.samples}
            if len(self.closed_at) > 4096:
                self.closed_at = {k: t for k, t in self.closed_at.items() if now - t < 2 * ttl}
            closed = {e: self.closed_at.get((p.namespace, p.name, e), self.born) for e, _ in groups}
        drop: set[tuple[int, int]] = set()
        for e, smp in groups:
            if e < new.epoch or done:
                if now - closed[e] >= ttl:
                    drop.add((e, smp))
                else:
                    p.retry_in = min(p.retry_in, closed[e] + ttl - now)
        return sorted(drop)

    def _backoff(self, p: Pass, a: core.StartSample, pods: Mapping[str, dict]) -> float:
        """When a retry may start: the latest failure of its sample (or pack) in this epoch plus an exponential
        backoff with jitter (from the pod's name: the same in every pass); at once after an eviction."""
        n = a.attempt + a.restarts
        if n == 0:
            return 0.0
        label, value = (LABEL_PACK, a.pack) if a.pack is not None else (LABEL_SAMPLE, a.sample)
        ended = [
            pod
            for pod in pods.values()
            if (pod.get("status") or {}).get("phase") == "Failed"
            and pod["metadata"].get("labels", {}).get(LABEL_EPOCH) == str(a.epoch)
            and pod["metadata"].get("labels", {}).get(label) == str(value)
        ]
        if not ended:
            return 0.0
        last = max(ended, key=_finished_at)
        if _preempted(last):
            return 0.0
        name = action_pod_name(p.name, a)
        jitter = 0.5 + 0.5 * int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        delay = min(self.settings.retry_backoff_max, self.settings.retry_backoff * 2 ** (n - 1)) * jitter
        return _finished_at(last) + delay

    def _due(self, p: Pass, actions: list[core.Action], pods: Mapping[str, dict]) -> list[list[core.StartSample]]:
        """The pods to create now: the StartSample actions by pod, less retries still held back by their backoff
        (`p.retry_in` says when the first of those is due)."""
        due = []
        for pack in packs([a for a in actions if isinstance(a, core.StartSample)]):
            wait = self._backoff(p, pack[0], pods) - self.clock()
            if wait > 0:
                p.retry_in = min(p.retry_in, wait)
            else:
                due.append(pack)
        return due

    def _creations(self, p: Pass, due: list[list[core.StartSample]]) -> list[Future[tuple[str, str]]]:
        """Start creating the pods, all at once (`_create_pod`)."""
        return self._submit(functools.partial(self._create_pod, p, pack) for pack in due)

    def _revoke(self, p: Pass, creating: list[Future[tuple[str, str]]]) -> None:
        """Take back the pods this pass created with a status write that failed: delete them, and until they are
        gone, their names are not adopted by a pass that asks for them ("already exists"), nor their pods read
        as its samples'."""
        futures.wait(creating)
        made = [f.result()[0] for f in creating if f.exception() is None and f.result()[1] == "created"]
        for name in made:
            self.revoked.add((p.namespace, name))
            self.recent.discard(("create", p.namespace, name))
        if made:
            log.info("%s/%s: status write failed; deleting the pods it started: %s", p.namespace, p.name, made)
            with contextlib.suppress(Exception):  # what is not deleted now, the next pass deletes (cleanup)
                self._each(functools.partial(self._delete_pod, p.namespace, name) for name in made)

    def _create_pod(self, p: Pass, pack: list[core.StartSample]) -> tuple[str, str]:
        """Create the pod of a pack (or sample): its name and "created"; "exists" (a previous pass made it, or made
        it a moment ago and the index has not shown it yet); or "blocked" (its name is still held by a pod taken
        back)."""
        import kopf

        pod = trainer_pod(p.spec, p.name, p.namespace, pack, self.settings.pods())
        name = pod["metadata"]["name"]
        key = ("create", p.namespace, name)
        if self.recent.within(key):  # made by a pass whose pod the index has not shown yet
            return name, "exists"
        kopf.adopt(pod, owner=cast(kopf.Body, p.body))  # kopf reads only metadata from the owner
        try:
            _drain(self.core.create_namespaced_pod(p.namespace, pod, _preload_content=False))
            metrics.PODS_CREATED.labels(namespace=p.namespace, search=p.name).inc()
            outcome = "created"
            self.revoked.discard((p.namespace, name))
        except ApiException as exc:
            if exc.status != 409:
                raise
            if self.revoked.within((p.namespace, name)):  # not the pod asked for: wait for it to be gone
                return name, "blocked"
            outcome = "exists"  # already exists: a previous pass made it
        self.recent.add(key)
        return name, outcome

    def _delete_pod(self, namespace: str, name: str) -> None:
        key = ("delete", namespace, name)
        if not self.recent.claim(key):  # asked for in the last half minute, or being asked for now
            return
        try:
            _drain(self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=30, _preload_content=False))
        except Exception as exc:
            if isinstance(exc, ApiException) and exc.status == 404:
                return
            self.recent.discard(key)  # not asked for after all: a later pass asks again
            raise

    # --- status and events --------------------------------------------------------------------

    def _conditions(self, spec: LossSearchSpec, st: LossSearchStatus) -> list[tuple[str, str, str, str]]:
        stuck = [x for x in st.samples if x.state == "Running" and x.message.startswith("waiting: ")]
        if st.phase == "Failed" or st.reason == "ConfigError":
            degraded = ("True", st.reason, st.message)
        elif stuck:
            what = "; ".join(f"sample {x.index}: {x.message.removeprefix('waiting: ')}" for x in stuck)
            degraded = ("True", "TrainerNotStarting", f"epoch {st.epoch}: {what}")
        else:
            degraded = ("False", "AsExpected", "")
        return [
            ("Ready", "True" if st.phase == "Succeeded" else "False", st.phase, st.message or st.phase),
            (
                "Progressing",
                "True" if st.phase == "Running" else "False",
                st.phase,
                f"epoch {st.epoch} of {spec.search.epochs}",
            ),
            ("Degraded", *degraded),
        ]

    def _patch_status(
        self,
        body: dict,
        status: dict[str, Any],
        conditions: list[tuple[str, str, str, str]],
        old: LossSearchStatus | None = None,
    ) -> dict[str, Any] | None:
        """Write the status unless it is what the resource already has; returns the resource as written, or None
        when nothing was written."""
        meta = body["metadata"]
        previous = {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}
        now = _now()
        conds = []
        for typ, st, reason, message in conditions:
            prev = previous.get(typ)
            changed = prev is None or prev.get("status") != st
            last = now if prev is None or changed else prev.get("lastTransitionTime", now)
            conds.append(
                {
                    "type": typ,
                    "status": st,
                    "reason": reason or "Unknown",
                    "message": message[:1000],
                    "observedGeneration": meta.get("generation", 0),
                    "lastTransitionTime": last,
                }
            )
        status = dict(status, conditions=conds, observedGeneration=meta.get("generation", 0))
        if _pruned(status) == _pruned(body.get("status") or {}):
            return None
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        try:
            got = self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch
            )
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict() from None
            raise
        self.wrote_at[(meta["namespace"], meta["name"])] = self.clock()
        return got if isinstance(got, dict) else None

    def event(self, obj: dict, typ: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        now = _now()
        ev = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": typ,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "amlfs-operator"},
            "reportingComponent": "amlfs-operator",
        }
        try:
            _drain(self.core.create_namespaced_event(meta["namespace"], ev, _preload_content=False))
        except ApiException as exc:
            log.warning("could not post event %s: %s", reason, exc.reason)


def _observe_handoff(stages: Stages, last_pushed: float | None) -> None:
    """The stages of a pass that started an epoch; detect and total when the pushed results said when they came."""
    for stage in metrics.HANDOFF_STAGES:
        metrics.HANDOFF_SECONDS.labels(stage).observe(stages.took.get(stage, 0.0))
    if last_pushed is not None:
        metrics.HANDOFF_SECONDS.labels("detect").observe(max(0.0, stages.due - last_pushed))
        metrics.HANDOFF_SECONDS.labels("total").observe(max(0.0, time.time() - last_pushed))


def _results(fs: list[Future[T]]) -> list[T]:
    """The results of the calls, once all of them have ended; the first failure is raised."""
    futures.wait(fs)
    for f in fs:
        if (exc := f.exception()) is not None:
            raise exc
    return [f.result() for f in fs]


def _logged(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:
        log.warning("background request failed (a later pass asks again): %s", exc)


def _drain(resp: Any) -> None:
    """Read and release a response whose body is not needed: turning a pod into client objects costs ~2 ms of
    CPU, more than the rest of the request (errors still raise ApiException)."""
    try:
        resp.read()
    finally:
        resp.release_conn()


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _storage_parts(actions: list[core.Action]) -> list[core.Action]:
    """The storage actions, a Promote split by target, so that their copies can go out together."""
    out: list[core.Action] = []
    for a in actions:
        if isinstance(a, core.Promote):
            out += [core.Promote(a.epoch, a.sample, a.source, [t]) for t in a.targets]
        elif isinstance(a, core.AppendHistory | core.WriteJson):
            out.append(a)
    return out


def _pruned(value: Any) -> Any:
    """A status as stored after a merge patch: null members are absent."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def _terminated(pod: dict) -> dict:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return {}


def _finished_at(pod: dict) -> float:
    ts = _terminated(pod).get("finishedAt")
    if not ts:
        return 0.0
    if isinstance(ts, str):
        return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    return ts.timestamp()


def _preempted(pod: dict) -> bool:
    """Ended by the platform (eviction, preemption, node shutdown or loss), not by its trainer."""
    status = pod.get("status") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    return status.get("reason", "") in ("Evicted", "Preempting", "Shutdown", "Terminated", "NodeLost") or (
        conds.get("DisruptionTarget", {}).get("status") == "True"
    )


def _waiting(pod: dict) -> tuple[str, str]:
    """Why a Pending pod has not started: its container's waiting reason, else an unmet scheduling condition."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        w = (cs.get("state") or {}).get("waiting")
        if w and w.get("reason"):
            return str(w["reason"]), str(w.get("message") or "").strip()
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return str(c.get("reason") or "Unschedulable"), str(c.get("message") or "").strip()
    return "", ""


def _created_at(pod: dict) -> float:
    ts = pod["metadata"].get("creationTimestamp")
    if not ts:
        return math.inf  # unknown: never timed out
    if isinstance(ts, str):
        return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    return float(ts.timestamp())


def _owned_by(pod: dict, uid: str) -> bool:
    """Whether the pod belongs to the search with this UID (pods that name no owner are taken as the search's)."""
    owners = pod["metadata"].get("ownerReferences") or []
    return not uid or not owners or any(o.get("uid") == uid for o in owners)
