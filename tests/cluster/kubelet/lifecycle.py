"""The pod state machine: admission (GPU allocation), the per-tick sync (init containers in order, restartPolicy,
activeDeadlineSeconds, graceful deletion), the pod status written to the API, and the failure injections tests use
(``fail_pod``, ``evict_pod``), which run on the worker thread like every other state change."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .common import GPU_RESOURCE, TERMINAL, _pod_requests, now_rfc3339, parse_time
from .containers import _signal_group
from .rest import ApiError, Rest
from .runtime import Container, PodRuntime


class LifecycleMixin:
    """Moves each PodRuntime from admission to its final status and removal."""

    # set by ProcessKubelet.__init__
    rest: Rest
    workdir: Path
    gpu_count: int
    _runtimes: dict[str, PodRuntime]
    _wake: threading.Event

    # -- failure injection (public test API) ----------------------------------------

    def fail_pod(
        self, namespace: str, name: str, exit_code: int = 1, container: str | None = None, timeout: float = 15
    ) -> None:
        """Make the pod's running container(s) exit now with ``exit_code`` (a
        crash: SIGKILL, reported as ``reason=Error`` and the given code). The
        restart policy then applies as for any exit."""

        def op():
            rt = self._runtime_by_name(namespace, name)
            hit = False
            for c in rt.all_containers():
                if (container is None or c.name == container) and c.state == "running":
                    c.forced_exit = exit_code
                    c.forced_reason = "Error"
                    _signal_group(c.popen, signal.SIGKILL)
                    hit = True
            if not hit:
                raise RuntimeError(
                    f"pod {namespace}/{name} has no running container" + (f" {container}" if container else "")
                )
            deadline = time.monotonic() + 5
            for c in rt.all_containers():
                if c.forced_exit is not None and c.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        c.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            self._sync_runtime(rt)

        self._run_in_worker(op, timeout)

    def evict_pod(
        self,
        namespace: str,
        name: str,
        message: str = "The node was low on resource: memory. ",
        timeout: float = 15,
    ) -> None:
        """Evict like the kubelet's eviction manager (hard threshold): kill
        the containers at once, then ``phase=Failed``, ``reason=Evicted`` and a
        ``DisruptionTarget`` condition. The Pod object stays (as for a real
        eviction); its owner controller reacts to the failure."""

        def op():
            rt = self._runtime_by_name(namespace, name)
            if rt.finished:
                raise RuntimeError(f"pod {namespace}/{name} already finished")
            self._kill_all(rt, grace=0)
            for c in rt.all_containers():
                if c.state != "terminated":
                    self._finish_container(c, default_code=137)
                    c.reason = "Error"
            rt.extra_conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "TerminationByKubelet",
                    "message": message.strip(),
                    "lastTransitionTime": now_rfc3339(),
                }
            )
            self._finish_pod(rt, "Failed", reason="Evicted", message=message)
            self._write_status(rt)

        self._run_in_worker(op, timeout)

    # -- admission ---------------------------------------------------------------------

    def _admit(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid, ns, name = meta["uid"], meta["namespace"], meta["name"]
        pdir = self.workdir / "pods" / f"{ns}_{name}_{uid[:8]}"
        pdir.mkdir(parents=True, exist_ok=True)

        def mk(c: dict, init: bool) -> Container:
            logdir = pdir / "logs" / c["name"]
            logdir.mkdir(parents=True, exist_ok=True)
            return Container(
                name=c["name"], spec=c, init=init, logdir=logdir, term_file=pdir / "termination" / c["name"]
            )

        (pdir / "termination").mkdir(exist_ok=True)
        rt = PodRuntime(
            uid=uid,
            namespace=ns,
            name=name,
            pod=pod,
            dir=pdir,
            init_containers=[mk(c, True) for c in spec.get("initContainers", [])],
            containers=[mk(c, False) for c in spec.get("containers", [])],
            start_time=now_rfc3339(),
            started_mono=time.monotonic(),
        )
        self._runtimes[uid] = rt
        # Device "allocation": nvidia.com/gpu indices, exclusive per pod.
        want = int(_pod_requests(pod).get(GPU_RESOURCE, 0))
        if want:
            taken = {i for r in self._runtimes.values() if not r.finished for i in r.gpus}
            free = [i for i in range(self.gpu_count) if i not in taken]
            if len(free) < want:
                for c in rt.all_containers():
                    c.reason = ""
                self._finish_pod(
                    rt,
                    "Failed",
                    reason="UnexpectedAdmissionError",
                    message=f"Allocate failed due to requested number of devices unavailable for "
                    f"{GPU_RESOURCE}. Requested: {want}, Available: {len(free)}",
                )
                self._write_status(rt)
                return
            rt.gpus = free[:want]
        self._write_status(rt)

    # -- the pod state machine ----------------------------------------------------------

    def _sync_runtime(self, rt: PodRuntime) -> None:
        pod = rt.pod
        meta, spec = pod["metadata"], pod["spec"]
        policy = spec.get("restartPolicy", "Always")
        now = time.monotonic()

        if rt.finished and not meta.get("deletionTimestamp"):
            # the final status may not have reached the API server (it was down): written until it has, as a
            # kubelet's status manager does (_write_status skips a status already written)
            self._write_status(rt)
            return

        # Deletion: SIGTERM, grace period, SIGKILL, final status, delete(grace 0).
        if meta.get("deletionTimestamp"):
            if not rt.terminating:
                rt.terminating = True
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = spec.get("terminationGracePeriodSeconds", 30)
                rt.kill_at = now + float(grace)
                for c in rt.all_containers():
                    if c.popen is not None and c.popen.poll() is None:
                        _signal_group(c.popen, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            alive = [c for c in rt.all_containers() if c.popen is not None and c.popen.poll() is None]
            if alive and now < rt.kill_at:
                return
            for c in alive:
                _signal_group(c.popen, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.popen.wait(timeout=5)
            if not rt.finished:
                for c in rt.all_containers():
                    if c.state == "running":
                        self._finish_container(c)
                    elif c.state == "waiting":
                        c.reason, c.message = "", ""
                codes = [c.exit_code for c in rt.containers if c.exit_code is not None]
                ok = bool(codes) and all(x == 0 for x in codes) and len(codes) == len(rt.containers)
                self._finish_pod(rt, "Succeeded" if ok else "Failed")
                with contextlib.suppress(ApiError):
                    self._write_status(rt)
            if not rt.removed:
                self._delete_now(pod)
                rt.removed = True
            return

        # activeDeadlineSeconds
        ads = spec.get("activeDeadlineSeconds")
        if ads is not None and time.time() - parse_time(rt.start_time) >= float(ads):
            self._kill_all(rt, grace=0)
            for c in rt.all_containers():
                if c.state == "running":
                    self._finish_container(c)
                    c.reason = "Error"
                elif c.state == "waiting":
                    c.reason, c.message = "", ""
            self._finish_pod(
                rt,
                "Failed",
                reason="DeadlineExceeded",
                message="Pod was active on the node longer than the specified deadline",
            )
            self._write_status(rt)
            return

        # Service-account token refresh.
        if rt.sa_volume is not None and now >= rt.sa_refresh_at:
            with contextlib.suppress(ApiError):
                self._refresh_token(rt)

        # Reap exited processes.
        for c in rt.all_containers():
            if c.state == "running" and c.popen is not None and c.popen.poll() is not None:
                self._finish_container(c)

        # Init containers, in order.
        for c in rt.init_containers:
            if c.state == "terminated" and c.exit_code == 0:
                continue
            if c.state == "terminated":  # failed
                if policy == "Never":
                    self._finish_pod(rt, "Failed")
                    self._write_status(rt)
                    return
                self._schedule_restart(c, now)
            if c.state == "waiting" and now >= c.next_start:
                self._start_container(rt, c)
            self._set_phase(rt, "Pending")
            self._write_status(rt)
            return

        # Regular containers.
        for c in rt.containers:
            if c.state == "terminated":
                restart = policy == "Always" or (policy == "OnFailure" and c.exit_code != 0)
                if restart:
                    self._schedule_restart(c, now)
            if c.state == "waiting" and now >= c.next_start:
                self._start_container(rt, c)
                if c.state == "terminated":  # StartError: handled next tick
                    self._wake.set()

        states = [c.state for c in rt.containers]
        if all(s == "terminated" for s in states) and rt.containers:
            codes = [c.exit_code for c in rt.containers]
            self._finish_pod(rt, "Succeeded" if all(x == 0 for x in codes) else "Failed")
        elif any(s == "running" for s in states) or any(c.ever_ran for c in rt.containers):
            self._set_phase(rt, "Running")
        else:
            self._set_phase(rt, "Pending")
        self._write_status(rt)

    def _schedule_restart(self, c: Container, now: float) -> None:
        c.last_state = {"terminated": c.terminated_state()}
        c.restart_count += 1
        c.state = "waiting"
        c.reason = "CrashLoopBackOff"
        c.message = f"back-off restarting failed container {c.name}"
        c.next_start = now + self._restart_delay(c)
        c.exit_code = None

    def _set_phase(self, rt: PodRuntime, phase: str) -> None:
        rt.phase = phase

    def _finish_pod(self, rt: PodRuntime, phase: str, reason: str | None = None, message: str | None = None) -> None:
        rt.phase = phase
        if reason:
            rt.reason = reason
        if message:
            rt.message = message
        rt.finished = True
        self._release(rt)

    def _release(self, rt: PodRuntime) -> None:
        rt.gpus = []

    def _status(self, rt: PodRuntime) -> dict:
        ts = rt.start_time
        inits_done = all(c.state == "terminated" and c.exit_code == 0 for c in rt.init_containers)
        ready = rt.phase == "Running" and all(c.state == "running" for c in rt.containers)

        def cond(t: str, ok: bool, reason: str | None = None) -> dict:
            d = {
                "type": t,
                "status": "True" if ok else "False",
                "lastTransitionTime": ts,
                "lastProbeTime": None,
            }
            if reason and not ok:
                d["reason"] = reason
            return d

        not_ready_reason = "PodCompleted" if rt.phase in TERMINAL else "ContainersNotReady"
        conditions = [
            cond(
                "PodReadyToStartContainers",
                rt.phase not in TERMINAL or any(c.ever_ran for c in rt.all_containers()),
            ),
            cond(
                "Initialized",
                inits_done,
                "ContainersNotInitialized" if rt.phase not in TERMINAL else "PodCompleted",
            ),
            cond("Ready", ready, not_ready_reason),
            cond("ContainersReady", ready, not_ready_reason),
            cond("PodScheduled", True),
            *rt.extra_conditions,
        ]
        status: dict[str, Any] = {
            "phase": rt.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": ts,
            "containerStatuses": [c.status() for c in rt.containers],
            "reason": rt.reason,
            "message": rt.message,
        }
        if rt.init_containers:
            status["initContainerStatuses"] = [c.status() for c in rt.init_containers]
        return status

    def _write_status(self, rt: PodRuntime) -> None:
        if rt.removed:
            return
        status = self._status(rt)
        blob = json.dumps(status, sort_keys=True)
        if blob == rt.last_status:
            return
        # merge-patch replaces lists whole; precondition on uid.
        body = {"metadata": {"uid": rt.uid}, "status": status}
        self.rest.merge_patch(f"/api/v1/namespaces/{rt.namespace}/pods/{rt.name}/status", body)
        rt.last_status = blob

    def _delete_now(self, pod: dict) -> None:
        ns, name, uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        try:
            self.rest.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body=body)
        except ApiError as e:
            if e.status not in (404, 409):
                raise
