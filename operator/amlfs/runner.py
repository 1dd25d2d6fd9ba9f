"""`amlfs run`: a whole search on one machine, driving the same core as the operator.

Samples are trained by a pool of long-lived trainer workers (`python -m amlfs_trainer.worker`), one per
`parallel` slot, GPUs assigned to slots round-robin when present. A worker keeps torch imported and the dataset
loaded and trains invocation after invocation, each exactly as a fresh `amlfs-trainer` process would (same
rewards, same checkpoint bytes). An invocation is one sample, or with `pack` > 1 up to `pack` samples of an epoch
(on a GPU the trainer's `auto` pack mode trains them vectorised; on the CPU one after another). `processes=True`
starts one `amlfs-trainer` process per invocation instead (what the operator's pods do); `inline=True` trains in
this process, one invocation at a time (benchmarks).

Failures: an invocation's exit code means what a trainer process's does (0 done, 2 configuration, never retried,
3 transient, anything else failed; retried up to maxRetries). A worker that dies (a crash, an OOM kill, SIGKILL)
is replaced by a fresh one at its slot's next invocation. The samples it was training count as a failed attempt,
as a trainer process killed the same way would; samples it had been handed but had not begun (the invocation had
not started, or later members of a sequential pack) are restarted without counting, as are those of a trainer
stopped by SIGTERM or SIGINT from outside. A sample that failed is retried in an invocation of its own.

Storage is `file://<workdir>/<name>` unless the spec names a storage URI. After every step the status is written
to `<workdir>/<name>/status.json` (the resource-status shape); re-running the same command resumes from it, and
Ctrl-C stops the trainers and leaves it resumable.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from amlfs import contract, core, effects, storage
from amlfs.contract import EXIT_CONFIG
from amlfs.spec import LossSearch, LossSearchSpec, SpecError, as_begun, immutable_paths
from amlfs.status import LossSearchStatus

STOP_TIMEOUT = 10.0  # seconds a trainer gets to exit after SIGTERM (or an idle worker after end of input)
Notify = Callable[[str, dict], None]


@dataclass
class Task:
    """One invocation handed to a slot, and what is known of it so far."""

    id: int
    epoch: int
    invocation: contract.Invocation
    log: Path
    done: set[int] = field(default_factory=set)  # samples whose result.json the trainer reported written
    ready: bool = False  # the trainer process had started (a worker: reported ready)
    started: bool = False  # the invocation was valid and began
    mode: str = ""  # its pack path, once started ("" unknown: every member may be training)
    rc: int | None = None  # its exit code, once it ended
    message: str = ""
    died: int | None = None  # the exit status of a trainer process that ended while running it

    @property
    def ended(self) -> bool:
        return self.rc is not None or self.died is not None

    @property
    def samples(self) -> list[int]:
        return self.invocation.samples

    def training(self) -> list[int]:
        """The members that may have been training when the trainer died (a sequential pack: the first member
        without a result; otherwise every member without one)."""
        left = [s for s in self.samples if s not in self.done]
        if not self.started:
            return []
        return left[:1] if self.mode == "sequential" else left


@dataclass
class Proc:
    """A sample being trained: which attempt, and in which task."""

    epoch: int
    sample: int
    attempt: int
    theta: list[float]
    task: Task

    @property
    def log(self) -> Path:
        return self.task.log


class Slot:
    """Runs one invocation at a time; `poll` brings its task up to date and frees the slot when the task ended."""

    def __init__(self, index: int, env: dict[str, str], device: str, notify: Notify) -> None:
        self.index = index
        self.env = env
        self.device = device
        self.notify = notify
        self.task: Task | None = None

    def submit(self, task: Task) -> None:
        raise NotImplementedError

    def poll(self) -> bool:
        """Update the task; True when something happened."""
        return False

    def stop(self) -> None:
        """Ask the trainer to end (now, if it is busy)."""

    def join(self) -> None:
        """Wait until the trainer has ended (killing it after STOP_TIMEOUT)."""

    def handle(self, message: dict[str, Any]) -> None:
        """A worker protocol message about the current task (see amlfs_trainer.worker)."""
        t = self.task
        if t is None or message.get("id") != t.id:
            return
        event = message.get("event")
        if event == "started":
            t.started, t.mode = True, str(message.get("mode") or "")
            self.notify("running", {"epoch": t.epoch, "samples": t.samples, "pid": self.pid, "slot": self.index})
        elif event == "member" and isinstance(message.get("sample"), int):
            t.done.add(message["sample"])
        elif event == "done" and isinstance(message.get("rc"), int):
            t.rc, t.message = message["rc"], str(message.get("message") or "")
            self.task = None

    @property
    def pid(self) -> int:
        return 0


class WorkerSlot(Slot):
    """A long-lived `amlfs_trainer.worker` process, started at the slot's first invocation and again after it
    died. Its protocol messages are read by a thread and applied in `poll` (in the runner's thread)."""

    def __init__(
        self,
        index: int,
        env: dict[str, str],
        device: str,
        notify: Notify,
        command: list[str],
        log: Path,
        wake: threading.Event,
    ) -> None:
        super().__init__(index, env, device, notify)
        self.command = command
        self.log = log
        self.wake = wake
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.messages: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def _spawn(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env,
                start_new_session=True,
            )
        self.ready = False
        self.messages = queue.SimpleQueue()  # a new queue per process: a dead one's last lines cannot leak
        assert self.proc.stdout is not None
        self.reader = threading.Thread(
            target=_read_messages, args=(self.proc.stdout, self.messages, self.wake), daemon=True
        )
        self.reader.start()
        self.notify("worker", {"slot": self.index, "pid": self.proc.pid})

    def submit(self, task: Task) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._reap()
            self._spawn()
        assert self.proc is not None and self.proc.stdin is not None
        self.task = task
        request = {
            "id": task.id,
            "env": contract.to_env(task.invocation),
            "log": str(task.log),
            "sent": time.time(),
        }
        with contextlib.suppress(OSError):  # a worker that died meanwhile: poll() sees it
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()

    def _drain(self) -> bool:
        seen = False
        while True:
            try:
                message = self.messages.get_nowait()
            except queue.Empty:
                return seen
            seen = True
            if message.get("event") == "ready":
                self.ready = True
            else:
                self.handle(message)

    def poll(self) -> bool:
        if self.proc is None:
            return False
        seen = self._drain()
        rc = self.proc.poll()
        if rc is None:
            return seen
        if self.reader is not None:
            self.reader.join(timeout=2.0)  # the lines it wrote before it ended
        self._drain()
        if self.task is not None:
            self.task.ready, self.task.died = self.ready, rc
            self.task = None
        self.notify("worker-exited", {"slot": self.index, "pid": self.proc.pid, "rc": rc})
        self._reap()
        return True

    def _reap(self) -> None:
        """Forget an ended worker: kill what is left of its process group, close its pipes."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.task is None:  # idle: end of input ends it
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def join(self) -> None:
        if self.proc is None:
            return
        _wait_or_kill(self.proc)
        self.task = None
        self._reap()


class ProcessSlot(Slot):
    """One fresh `amlfs-trainer` process per invocation."""

    def __init__(self, index: int, env: dict[str, str], device: str, notify: Notify, command: list[str]) -> None:
        super().__init__(index, env, device, notify)
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def submit(self, task: Task) -> None:
        with open(task.log, "ab") as f:
            self.proc = subprocess.Popen(
                [*self.command, *contract.to_argv(task.invocation)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        task.ready = task.started = True  # a process's progress is unknown until it exits: every member trains
        self.task = task

    def poll(self) -> bool:
        if self.task is None or self.proc is None:
            return False
        rc = self.proc.poll()
        if rc is None:
            return False
        if rc < 0:
            self.task.died = rc
        else:
            self.task.rc = rc
        self.task = None
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def join(self) -> None:
        if self.proc is not None:
            _wait_or_kill(self.proc)
        self.task = None


class InlineSlot(Slot):
    """Trains in this process (the worker's code, without a process of its own): `submit` returns when done."""

    def submit(self, task: Task) -> None:
        from amlfs_trainer.worker import serve

        self.task = task
        task.ready = True
        request = {"id": task.id, "env": contract.to_env(task.invocation), "log": str(task.log)}
        serve(request, self.handle, own_process=False)


def _read_messages(stream: IO[bytes], messages: queue.SimpleQueue[dict[str, Any]], wake: threading.Event) -> None:
    """A worker's stdout, one JSON message per line, until it closes."""
    try:
        for line in stream:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                messages.put(message)
                wake.set()
    except (OSError, ValueError):  # closed under us
        pass
    wake.set()


def _wait_or_kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class LocalRunner:
    def __init__(
        self,
        manifest: LossSearch,
        workdir: Path,
        parallel: int = 1,
        device: str = "auto",
        threads: int = 0,
        on_event: Notify | None = None,
        trainer: list[str] | None = None,
        cache_dir: Path | None = None,
        inline: bool = False,
        pack: int = 1,
        processes: bool = False,
        worker: list[str] | None = None,
    ) -> None:
        self.manifest = manifest
        self.spec: LossSearchSpec = manifest.spec
        self.name = manifest.metadata.name
        self.dir = (workdir / self.name).absolute()
        self.root = (
            storage.normalize(storage.join(self.spec.storage.uri, self.name))
            if self.spec.storage.uri
            else f"file://{self.dir}"
        )
        self.parallel = max(1, parallel)
        self.device = device
        self.gpus = _gpu_count() if device in ("auto", "cuda") else 0
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.parallel)
        self.on_event = on_event or (lambda kind, data: None)
        self.trainer = trainer or [sys.executable, "-m", "amlfs_trainer.cli"]  # processes=True
        self.worker = worker or [sys.executable, "-m", "amlfs_trainer.worker"]
        self.cache_dir = cache_dir or (workdir / ".cache").absolute()
        self.inline = inline  # train in this process, one invocation at a time (benchmarks)
        self.processes = processes  # one trainer process per invocation instead of long-lived workers
        self.pack = max(1, pack)  # samples of an epoch per invocation, at most
        if inline:
            self.parallel = 1
        self.procs: dict[int, Proc] = {}
        self.slots: list[Slot] = []
        self.status_path = self.dir / "status.json"
        self.spec_path = self.dir / "spec.json"
        self._ids = itertools.count()
        self._wake = threading.Event()

    # --- persistence ---------------------------------------------------------------------------

    def load(self) -> LossSearchStatus | None:
        if self.spec_path.exists():
            self._check_same_search(json.loads(self.spec_path.read_text()))
        if not self.status_path.exists():
            return None
        try:
            return LossSearchStatus.model_validate_json(self.status_path.read_text())
        except ValueError:
            raise SpecError(f"{self.status_path}: corrupt status file; move it away to start over") from None

    def _check_same_search(self, old: dict) -> None:
        """Refuse a resume whose spec changed a field the CRD makes immutable (the same markers, spec.py)."""
        new = json.loads(self.spec.model_dump_json(by_alias=True))
        old = as_begun(old)  # a field missing from a search begun before it existed: as that search ran
        for path in immutable_paths():
            before, after = _at(old, path), _at(new, path)
            if before != after:
                change = "" if isinstance(after, dict) else f" ({before!r} -> {after!r})"
                raise SpecError(
                    f"spec.{path}: changed since this search began in {self.dir}{change}; keep it, or use a "
                    "new metadata.name or --workdir"
                )

    def save(self, status: LossSearchStatus) -> None:
        storage.write_bytes(str(self.status_path), (json.dumps(status.to_json_dict(), indent=1) + "\n").encode())

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> LossSearchStatus:
        status = self.load()
        self.dir.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(str(self.spec_path), self.spec.model_dump_json(by_alias=True, indent=1).encode())
        self.slots = [self._slot(i) for i in range(self.parallel)]
        try:
            while True:
                obs = self.observe(status)
                status, actions = core.step(self.spec, status, obs, self.root)
                starts = [a for a in actions if isinstance(a, core.StartSample)]
                for a in actions:
                    if not isinstance(a, core.StartSample):
                        self.apply(a)
                self.save(status)
                self.on_event("status", {"status": status})
                self.launch_all([a for a in starts if a.sample not in self.procs])
                if status.phase in ("Succeeded", "Failed", "Suspended"):
                    return status
                self.wait()
        finally:
            self.stop_all()

    def _slot(self, i: int) -> Slot:
        env = contract.without_contract_env(os.environ) | {"PYTHONUNBUFFERED": "1"}
        device = self.device
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % self.gpus)
            device = "cuda"
        if self.inline:
            return InlineSlot(i, env, device, self.on_event)
        if self.processes:
            return ProcessSlot(i, env, device, self.on_event, self.trainer)
        log = self.dir / "logs" / f"worker-{i}.log"
        return WorkerSlot(i, env, device, self.on_event, self.worker, log, self._wake)

    def observe(self, status: LossSearchStatus | None) -> list[core.Observation]:
        for slot in self.slots:
            slot.poll()
        if status is None:
            return []
        obs: list[core.Observation] = []
        for x in status.samples:
            p = self.procs.get(x.index)
            if p is not None and p.epoch != status.epoch:
                continue
            if p is not None:
                o = self._outcome(p)
                if o is None:
                    obs.append(core.Observation(status.epoch, x.index, "running", p.attempt))
                    continue
                del self.procs[x.index]
                obs.append(o)
                continue
            if x.state in ("Pending", "Running"):
                done = effects.read_result(self.root, status.epoch, x.index, x.attempt, x.theta)
                if done is not None:
                    obs.append(done)
                elif x.state == "Running":
                    obs.append(core.Observation(status.epoch, x.index, "absent", x.attempt))
        return obs

    def _outcome(self, p: Proc) -> core.Observation | None:
        """What became of a sample in a task; None while it may still be training."""
        t, epoch, sample = p.task, p.epoch, p.sample
        if sample not in t.done and not t.ended:
            return None
        done = effects.read_result(self.root, epoch, sample, p.attempt, p.theta)
        if done is not None:  # also after exit code 3 or a death: members with a result.json are complete
            return done

        def failed(outcome: core.Outcome, message: str, rc: int) -> core.Observation:
            if outcome in ("failed", "config-error"):
                self.on_event("sample-failed", {"epoch": epoch, "sample": sample, "rc": rc, "message": message})
            return core.Observation(epoch, sample, outcome, p.attempt, message=message)

        if sample in t.done:
            return failed("failed", "reported done without result.json", 0)
        if t.died is not None:
            rc = t.died
            if rc < 0 and -rc in (signal.SIGTERM, signal.SIGINT):
                return failed("preempted", f"killed by signal {-rc}", rc)
            how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            if not t.ready:
                return failed("failed", f"trainer did not start ({how}): {_last_line(p.log)}", rc)
            if sample not in t.training():
                return failed("preempted", f"not begun: its trainer ended ({how}) before it", rc)
            return failed("failed", f"trainer {how}: {_last_line(p.log)}", rc)
        assert t.rc is not None
        if t.rc == 0:
            return failed("failed", "exited 0 without result.json", t.rc)
        tail = t.message if t.rc == EXIT_CONFIG and t.message else _last_line(p.log)
        if t.rc == EXIT_CONFIG:
            return failed("config-error", tail, t.rc)
        return failed("failed", f"exit code {t.rc}: {tail}", t.rc)

    def apply(self, action: core.Action) -> None:
        effects.apply_storage(action)
        if isinstance(action, core.Promote):
            self.on_event("promote", {"epoch": action.epoch, "sample": action.sample, "targets": action.targets})
        elif isinstance(action, core.AppendHistory):
            self.on_event("epoch", action.record)
        elif isinstance(action, core.Finished):
            self.on_event("finished", {"phase": action.phase, "message": action.message})

    def invocation(
        self, a: core.StartSample, device: str = "auto", more: tuple[core.StartSample, ...] = ()
    ) -> contract.Invocation:
        """The trainer invocation of a sample (a pack of one), or of it and `more` of the same epoch and start."""
        return contract.Invocation(
            spec=f"@{self.spec_path}",
            search=self.name,
            namespace=self.manifest.metadata.namespace,
            epoch=a.epoch,
            attempt=a.attempt,
            members=tuple(contract.Member(x.sample, tuple(x.theta), x.output) for x in (a, *more)),
            start=a.start.uri if a.start is not None else "",
            start_sha256=a.start.sha256 if a.start is not None else "",
            device=device,
            threads=self.threads,
            cache_dir=str(self.cache_dir),
        )

    def command(self, a: core.StartSample, device: str = "auto") -> list[str]:
        """A fresh trainer process's command line for one sample."""
        return [*self.trainer, *contract.to_argv(self.invocation(a, device))]

    def launch_all(self, queue: list[core.StartSample]) -> None:
        """Hand the queue to the free slots: packs of up to `pack` first attempts, spread over the free slots;
        a retry alone."""
        queue = list(queue)
        while queue:
            free = [s for s in self.slots if s.task is None]
            if not free:
                return
            # a slot whose members all reported is about to be free: count it when sizing packs
            ending = [s for s in self.slots if s.task is not None and set(s.task.samples) <= s.task.done]
            a = queue.pop(0)
            group = [a]
            if a.attempt == 0:
                size = min(self.pack, -(-(len(queue) + 1) // (len(free) + len(ending))))
                mates = [b for b in queue if b.attempt == 0 and b.start == a.start][: size - 1]
                group += mates
                queue = [b for b in queue if b not in mates]
            self.launch(free[0], group)

    def launch(self, slot: Slot, group: list[core.StartSample]) -> None:
        a = group[0]
        samples = "-".join(f"s{x.sample:02d}" for x in group)
        log = self.dir / "logs" / f"e{a.epoch:04d}-{samples}-a{a.attempt}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_bytes(b"")
        task = Task(next(self._ids), a.epoch, self.invocation(a, slot.device, tuple(group[1:])), log)
        for x in group:
            self.procs[x.sample] = Proc(x.epoch, x.sample, x.attempt, list(x.theta), task)
        slot.submit(task)
        for x in group:
            self.on_event("start", {"epoch": x.epoch, "sample": x.sample, "attempt": x.attempt})

    def wait(self) -> None:
        """Until there is news (a trainer reported or ended), or no slot is busy."""
        while True:
            news = [s.poll() for s in self.slots]  # every slot, so that each one's messages are applied
            if any(news) or all(s.task is None for s in self.slots):
                return
            self._wake.wait(timeout=0.2)
            self._wake.clear()

    def stop_all(self) -> None:
        for slot in self.slots:
            slot.stop()
        for slot in self.slots:
            slot.join()
        self.procs.clear()


def _at(doc: dict, path: str) -> Any:
    """The value at a dotted path of a JSON document (None where it is missing)."""
    value: Any = doc
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors[-1] if errors else lines[-1] if lines else "")[-500:]
