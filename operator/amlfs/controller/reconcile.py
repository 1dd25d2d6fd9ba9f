"""One level-based reconciliation pass of a LossSearch: a thin shell around `amlfs.core.step`.

Everything is re-derived from the resource's status and the cluster each pass, so a missed event or an
operator restart changes nothing:

1. read the LossSearch (fresh, with its resourceVersion) and the search's pods;
2. turn pods, pushed rewards and result.json files into observations;
3. `core.step` decides the new status and the actions;
4. apply the storage actions (idempotent server-side copies and writes);
5. patch the status with the resourceVersion read in 1 (a conflict aborts the pass: nothing was started);
6. create the pods of StartSample actions ("already exists" is success), delete pods of closed epochs and
   their Pushgateway groups, post events, update metrics.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from amlfs import core, effects, storage
from amlfs.contract import EXIT_CONFIG
from amlfs.controller import metrics
from amlfs.controller.pods import LABEL_EPOCH, LABEL_SEARCH, PodSettings, pod_name, trainer_pod
from amlfs.controller.rewards import PushedResult, PushgatewayReader
from amlfs.spec import LossSearchSpec, explain
from amlfs.status import LossSearchStatus, SampleStatus

GROUP, VERSION, PLURAL, KIND = "amlfs.io", "v1alpha1", "losssearches", "LossSearch"
log = logging.getLogger("amlfs.operator")


@dataclass
class Settings:
    pushgateway: str = ""  # URL the operator reads rewards from
    pod_pushgateway: str = ""  # URL trainer pods push to (default: the same)
    default_storage: str = ""  # storage root when a spec names none (s3://bucket/prefix)
    pod_s3_endpoint: str = ""  # S3 endpoint for pods when the spec names none
    reward_timeout: float = 30.0  # seconds after a pod succeeded before falling back to result.json
    interval: float = 5.0  # seconds between passes when nothing wakes the search
    run_as_user: int | None = 1000  # uid/gid/fsGroup of trainer pods; None: the platform assigns them

    def pods(self) -> PodSettings:
        return PodSettings(
            pushgateway=self.pod_pushgateway or self.pushgateway,
            s3_endpoint=self.pod_s3_endpoint,
            run_as_user=self.run_as_user,
        )


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


class Reconciler:
    def __init__(self, api: client.ApiClient, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.settings = settings
        self.rewards = PushgatewayReader(settings.pushgateway)
        self.clock = clock

    # --- the pass -----------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> float:
        """One pass. Returns the seconds until the next pass is due (earlier if something wakes it)."""
        t0 = time.perf_counter()
        try:
            return self._reconcile(namespace, name)
        except Conflict:
            return 0.0
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)

    def _reconcile(self, namespace: str, name: str) -> float:
        try:
            body = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return self.settings.interval
            raise
        if body["metadata"].get("deletionTimestamp"):
            return self.settings.interval
        try:
            spec = LossSearchSpec.model_validate(body.get("spec") or {})
        except ValueError as exc:
            msg = explain(exc, "spec") if isinstance(exc, ValidationError) else str(exc)
            self._patch_status(
                body,
                {"phase": "Failed", "reason": "InvalidSpec", "message": msg},
                [("Degraded", "True", "InvalidSpec", msg)],
            )
            return self.settings.interval
        raw = body.get("status") or {}
        old = LossSearchStatus.model_validate(raw) if raw.get("mu") else None
        p = Pass(namespace, name, body, spec, old)
        root = self.root(p)
        if root is None:
            msg = "spec.storage.uri: empty and the operator has no default storage; set spec.storage.uri"
            self._patch_status(
                body,
                {"phase": "Failed", "reason": "NoStorage", "message": msg},
                [("Degraded", "True", "NoStorage", msg)],
            )
            return self.settings.interval
        pods = self._pods(namespace, name)
        obs, pending_reward = self.observe(p, pods, root)
        new, actions = core.step(spec, old, obs, root)
        for a in actions:
            if not isinstance(a, core.StartSample):
                self._apply(p, a)
        self._patch_status(body, new.to_json_dict(), self._conditions(spec, new), old)
        self._after_status(p, new, actions, pods)
        if new.phase in ("Running",) and pending_reward:
            return min(self.settings.interval, 1.0)
        return self.settings.interval

    def root(self, p: Pass) -> str | None:
        base = p.spec.storage.uri or self.settings.default_storage
        return storage.normalize(storage.join(base, p.namespace, p.name)) if base else None

    # --- observations -------------------------------------------------------------------------

    def observe(self, p: Pass, pods: dict[str, dict], root: str) -> tuple[list[core.Observation], bool]:
        st = p.old
        if st is None or not st.samples:
            return [], False
        pushed: dict[tuple[int, int], PushedResult] | None = None
        obs: list[core.Observation] = []
        waiting = False
        for x in st.samples:
            if x.state in ("Succeeded", "NoReward", "Failed", "ConfigError"):
                continue
            pod = pods.get(pod_name(p.name, st.epoch, x.index, x.attempt, x.restarts))
            if pod is None:
                if x.state == "Running":
                    done = effects.read_result(root, st.epoch, x.index, x.attempt, x.theta)
                    obs.append(done or core.Observation(st.epoch, x.index, "absent", x.attempt))
                continue
            phase = (pod.get("status") or {}).get("phase", "Pending")
            if phase in ("Pending", "Running", "Unknown"):
                obs.append(core.Observation(st.epoch, x.index, "running", x.attempt))
            elif phase == "Succeeded":
                if pushed is None:
                    pushed = self.rewards.results(p.namespace, p.name)
                got = pushed.get((st.epoch, x.index))
                if got is not None:
                    obs.append(
                        core.Observation(
                            st.epoch,
                            x.index,
                            "no-reward" if got.diverged else "succeeded",
                            x.attempt,
                            reward=got.reward,
                            sha256=got.sha256,
                        )
                    )
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
                obs.append(self._failed(p, st.epoch, x, pod))
        return obs, waiting

    def _failed(self, p: Pass, epoch: int, x: SampleStatus, pod: dict) -> core.Observation:
        status = pod.get("status") or {}
        reason = status.get("reason", "")
        conds = {c.get("type"): c for c in status.get("conditions") or []}
        term = _terminated(pod)
        code = term.get("exitCode")
        msg = (term.get("message") or status.get("message") or reason or f"exit code {code}").strip()[-500:]
        if reason in ("Evicted", "Preempting", "Shutdown", "Terminated", "NodeLost") or (
            conds.get("DisruptionTarget", {}).get("status") == "True"
        ):
            metrics.PODS_FAILED.labels(p.namespace, p.name, "preempted").inc()
            return core.Observation(epoch, x.index, "preempted", x.attempt, message=msg)
        if code == EXIT_CONFIG:
            metrics.PODS_FAILED.labels(p.namespace, p.name, "config").inc()
            return core.Observation(epoch, x.index, "config-error", x.attempt, message=msg)
        kind = reason if reason in metrics.FAILURE_REASONS else "error"
        metrics.PODS_FAILED.labels(p.namespace, p.name, kind).inc()
        return core.Observation(epoch, x.index, "failed", x.attempt, message=msg)

    # --- actions ------------------------------------------------------------------------------

    def _apply(self, p: Pass, a: core.Action) -> None:
        effects.apply_storage(a)
        if isinstance(a, core.Promote):
            p.events.append(("Normal", "Promoted", f"epoch {a.epoch} sample {a.sample} -> {', '.join(a.targets)}"))
        elif isinstance(a, core.AppendHistory):
            r = a.record
            p.events.append(
                (
                    "Normal",
                    "EpochCompleted",
                    f"epoch {r['epoch']}: best reward {r['bestReward']:.4f} "
                    f"(sample {r['best']}), mean {r['meanReward']:.4f}",
                )
            )
            metrics.EPOCHS.labels(namespace=p.namespace, search=p.name).inc()
        elif isinstance(a, core.Finished):
            p.events.append(("Normal" if a.phase == "Succeeded" else "Warning", f"Search{a.phase}", a.message))

    def _after_status(self, p: Pass, new: LossSearchStatus, actions: list[core.Action], pods: dict[str, dict]) -> None:
        old = p.old
        if new.samples and (old is None or old.epoch != new.epoch or not old.samples):
            p.events.append(("Normal", "EpochStarted", f"epoch {new.epoch}: {len(new.samples)} samples"))
        if old is not None and old.epoch == new.epoch:
            before = {x.index: x for x in old.samples}
            for x in new.samples:
                b = before.get(x.index)
                if b is not None and x.attempt > b.attempt:
                    p.events.append(("Warning", "SampleRetried", f"epoch {new.epoch} sample {x.index}: {x.message}"))
                if b is not None and x.state in ("Failed", "ConfigError") and b.state != x.state:
                    p.events.append(("Warning", f"Sample{x.state}", f"epoch {new.epoch} sample {x.index}: {x.message}"))
        for a in actions:
            if isinstance(a, core.StartSample):
                self._create_pod(p, a)
        if self.settings.pushgateway:  # level-based: drop the groups of every closed epoch still there
            for epoch, sample in self.rewards.results(p.namespace, p.name):
                if epoch < new.epoch or new.phase == "Succeeded":
                    self.rewards.delete(p.namespace, p.name, epoch, sample)
        for pname, pod in pods.items():
            epoch = int(pod["metadata"].get("labels", {}).get(LABEL_EPOCH, "-1"))
            if epoch < new.epoch or new.phase == "Succeeded":
                self._delete_pod(p.namespace, pname)
        for typ, reason, message in p.events:
            self.event(p.body, typ, reason, message)
        metrics.observe_status(p.namespace, p.name, new, p.spec)

    def _create_pod(self, p: Pass, a: core.StartSample) -> None:
        import kopf

        pod = trainer_pod(p.spec, p.name, p.namespace, a, self.settings.pods())
        kopf.adopt(pod, owner=cast(kopf.Body, p.body))  # kopf reads only metadata from the owner
        try:
            self.core.create_namespaced_pod(p.namespace, pod)
            metrics.PODS_CREATED.labels(namespace=p.namespace, search=p.name).inc()
        except ApiException as exc:
            if exc.status != 409:  # already exists: a previous pass made it
                raise

    def _delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=30)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _pods(self, namespace: str, name: str) -> dict[str, dict]:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{LABEL_SEARCH}={name}")
        api = self.core.api_client
        return {
            pod.metadata.name: api.sanitize_for_serialization(pod)
            for pod in pods.items
            if not pod.metadata.deletion_timestamp
        }

    # --- status and events --------------------------------------------------------------------

    def _conditions(self, spec: LossSearchSpec, st: LossSearchStatus) -> list[tuple[str, str, str, str]]:
        degraded = st.phase == "Failed" or st.reason == "ConfigError"
        return [
            ("Ready", "True" if st.phase == "Succeeded" else "False", st.phase, st.message or st.phase),
            (
                "Progressing",
                "True" if st.phase == "Running" else "False",
                st.phase,
                f"epoch {st.epoch} of {spec.search.epochs}",
            ),
            (
                "Degraded",
                "True" if degraded else "False",
                st.reason if degraded else "AsExpected",
                st.message if degraded else "",
            ),
        ]

    def _patch_status(
        self,
        body: dict,
        status: dict[str, Any],
        conditions: list[tuple[str, str, str, str]],
        old: LossSearchStatus | None = None,
    ) -> None:
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
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch
            )
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict() from None
            raise

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
            self.core.create_namespaced_event(meta["namespace"], ev)
        except ApiException as exc:
            log.warning("could not post event %s: %s", reason, exc.reason)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
