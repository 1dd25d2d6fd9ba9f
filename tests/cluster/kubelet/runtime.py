"""The kubelet's in-memory state of the pods it runs: one PodRuntime per pod, one Container per (init) container,
and the container status each reports to the API."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Container:
    name: str
    spec: dict
    init: bool
    logdir: Path
    term_file: Path
    popen: subprocess.Popen | None = None
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    restart_count: int = 0
    instances: int = 0
    last_state: dict | None = None
    next_start: float = 0.0  # monotonic time the next (re)start may happen
    forced_exit: int | None = None  # fail_pod: report this code on exit
    forced_reason: str | None = None
    ever_ran: bool = False

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{max(self.instances - 1, 0)}.log"

    def terminated_state(self) -> dict:
        st = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.message:
            st["message"] = self.message
        return {k: v for k, v in st.items() if v is not None}

    @property
    def container_id(self) -> str | None:
        return f"process://{self.popen.pid}" if self.popen is not None else None

    def status(self) -> dict:
        if self.state == "running":
            state = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self.terminated_state()}
        else:
            state = {"waiting": {k: v for k, v in (("reason", self.reason), ("message", self.message)) if v}}
        st = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "process://" + self.spec.get("image", ""),
            "ready": self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": self.last_state or {},
        }
        if self.popen is not None:
            st["containerID"] = self.container_id
        return st


@dataclass
class PodRuntime:
    uid: str
    namespace: str
    name: str
    pod: dict
    dir: Path
    init_containers: list[Container]
    containers: list[Container]
    start_time: str
    started_mono: float
    phase: str = "Pending"
    reason: str | None = None
    message: str | None = None
    extra_conditions: list[dict] = field(default_factory=list)
    terminating: bool = False
    kill_at: float = 0.0
    finished: bool = False  # processes stopped, final status computed
    removed: bool = False  # deleted from the API (or gone)
    last_status: str = ""
    sa_volume: str | None = None  # the projected volume with the SA token
    sa_token_source: dict | None = None
    sa_refresh_at: float = 0.0
    prepared: bool = False  # volumes written
    gpus: list[int] = field(default_factory=list)
    volumes: dict[str, Path] = field(default_factory=dict)  # volume name -> host dir
    read_only: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def all_containers(self) -> list[Container]:
        return self.init_containers + self.containers
