"""`amlfs run`: a whole search on one machine, driving the same core as the operator.

Each sample is an `amlfs-trainer` subprocess (the same CLI the operator's pods run), at most `parallel` at a
time, GPUs assigned round-robin when present. Storage is `file://<workdir>/<name>` unless the spec names a
storage URI. After every step the status is written to `<workdir>/<name>/status.json` (the resource-status
shape); re-running the same command resumes from it, and Ctrl-C leaves it resumable.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from amlfs import core, effects, storage
from amlfs.spec import LossSearch, LossSearchSpec, SpecError
from amlfs.status import LossSearchStatus

EXIT_CONFIG = 2
LEGACY_SEARCH = {"commonRandomNumbers": False, "antithetic": False, "reward": "accuracy"}
IMMUTABLE = (
    "space",
    "parameterization",
    "intervals",
    "mode",
    "seed",
    "sigma",
    "init",
    "logitRange",
    "commonRandomNumbers",
    "reward",
    "antithetic",
)


class _Finished:
    """A sample trained inline (in this process): already done, with the trainer's exit code."""

    def __init__(self, rc: int) -> None:
        self.returncode = rc
        self.pid = 0

    def poll(self) -> int:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode


@dataclass
class Proc:
    epoch: int
    sample: int
    attempt: int
    popen: subprocess.Popen[bytes] | _Finished
    log: Path


class LocalRunner:
    def __init__(
        self,
        manifest: LossSearch,
        workdir: Path,
        parallel: int = 1,
        device: str = "auto",
        threads: int = 0,
        on_event: Callable[[str, dict], None] | None = None,
        trainer: list[str] | None = None,
        cache_dir: Path | None = None,
        inline: bool = False,
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
        self.trainer = trainer or [sys.executable, "-m", "amlfs_trainer.cli"]
        self.cache_dir = cache_dir or (workdir / ".cache").absolute()
        self.inline = inline  # run samples one by one inside this process (benchmarks; same CLI, no start-up cost)
        if inline:
            self.parallel = 1
        self.procs: dict[int, Proc] = {}
        self.status_path = self.dir / "status.json"
        self.spec_path = self.dir / "spec.json"
        self._next_gpu = 0

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
        new = json.loads(self.spec.model_dump_json(by_alias=True))
        # a field missing from a search begun before it existed counts with the value that reproduces that search
        old = old | {"search": LEGACY_SEARCH | old.get("search", {})}
        for key in IMMUTABLE:
            if old.get("search", {}).get(key) != new["search"].get(key):
                raise SpecError(
                    f"spec.search.{key}: changed since this search began in {self.dir} "
                    f"({old['search'].get(key)!r} -> {new['search'].get(key)!r}); keep it, or use "
                    "a new metadata.name or --workdir"
                )
        for key in ("task", "model"):
            if old.get(key) != new[key]:
                raise SpecError(
                    f"spec.{key}: changed since this search began in {self.dir}; keep it, or use a "
                    "new metadata.name or --workdir"
                )

    def save(self, status: LossSearchStatus) -> None:
        storage.write_bytes(str(self.status_path), (json.dumps(status.to_json_dict(), indent=1) + "\n").encode())

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> LossSearchStatus:
        status = self.load()
        self.dir.mkdir(parents=True, exist_ok=True)
        storage.write_bytes(str(self.spec_path), self.spec.model_dump_json(by_alias=True, indent=1).encode())
        queue: list[core.StartSample] = []
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
                queue = [a for a in starts if a.sample not in self.procs]
                while queue and len(self.procs) < self.parallel:
                    self.launch(queue.pop(0))
                if status.phase in ("Succeeded", "Failed", "Suspended"):
                    return status
                self.wait()
        finally:
            self.stop_all()

    def observe(self, status: LossSearchStatus | None) -> list[core.Observation]:
        if status is None:
            return []
        obs: list[core.Observation] = []
        for x in status.samples:
            p = self.procs.get(x.index)
            if p is not None and p.epoch != status.epoch:
                continue
            if p is not None:
                rc = p.popen.poll()
                if rc is None:
                    obs.append(core.Observation(status.epoch, x.index, "running", p.attempt))
                    continue
                del self.procs[x.index]
                obs.append(self._finished(status.epoch, x.index, p, rc))
                continue
            if x.state in ("Pending", "Running"):
                done = effects.read_result(self.root, status.epoch, x.index, x.attempt, x.theta)
                if done is not None:
                    obs.append(done)
                elif x.state == "Running":
                    obs.append(core.Observation(status.epoch, x.index, "absent", x.attempt))
        return obs

    def _finished(self, epoch: int, sample: int, p: Proc, rc: int) -> core.Observation:
        if rc == 0:
            done = effects.read_result(self.root, epoch, sample, p.attempt)
            if done is not None:
                return done
            return core.Observation(epoch, sample, "failed", p.attempt, message="exited 0 without result.json")
        tail = _last_line(p.log)
        self.on_event("sample-failed", {"epoch": epoch, "sample": sample, "rc": rc, "message": tail})
        if rc == EXIT_CONFIG:
            return core.Observation(epoch, sample, "config-error", p.attempt, message=tail)
        if rc < 0 and -rc in (signal.SIGTERM, signal.SIGINT):
            return core.Observation(epoch, sample, "preempted", p.attempt, message=f"killed by signal {-rc}")
        return core.Observation(epoch, sample, "failed", p.attempt, message=f"exit code {rc}: {tail}")

    def apply(self, action: core.Action) -> None:
        effects.apply_storage(action)
        if isinstance(action, core.Promote):
            self.on_event("promote", {"epoch": action.epoch, "sample": action.sample, "targets": action.targets})
        elif isinstance(action, core.AppendHistory):
            self.on_event("epoch", action.record)
        elif isinstance(action, core.Finished):
            self.on_event("finished", {"phase": action.phase, "message": action.message})

    def command(self, a: core.StartSample) -> list[str]:
        cmd = [
            *self.trainer,
            "--spec",
            f"@{self.spec_path}",
            "--search",
            self.name,
            "--namespace",
            self.manifest.metadata.namespace,
            "--epoch",
            str(a.epoch),
            "--sample",
            str(a.sample),
            "--attempt",
            str(a.attempt),
            "--theta",
            json.dumps(a.theta),
            "--output",
            a.output,
            "--cache-dir",
            str(self.cache_dir),
        ]
        if a.start is not None:
            cmd += ["--start", a.start.uri, "--start-sha256", a.start.sha256]
        return cmd

    def launch(self, a: core.StartSample) -> None:
        env = dict(os.environ, AMLFS_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        device = self.device
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(self._next_gpu % self.gpus)
            self._next_gpu += 1
            device = "cuda"
        log = self.dir / "logs" / f"e{a.epoch:04d}-s{a.sample:02d}-a{a.attempt}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if self.inline:
            self.procs[a.sample] = Proc(a.epoch, a.sample, a.attempt, self._run_inline(a, device, log), log)
            self.on_event("start", {"epoch": a.epoch, "sample": a.sample, "attempt": a.attempt})
            return
        with open(log, "wb") as f:
            popen = subprocess.Popen(
                [*self.command(a), "--device", device],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs[a.sample] = Proc(a.epoch, a.sample, a.attempt, popen, log)
        self.on_event("start", {"epoch": a.epoch, "sample": a.sample, "attempt": a.attempt})

    def _run_inline(self, a: core.StartSample, device: str, log: Path) -> _Finished:
        import contextlib

        from amlfs_trainer.cli import main as trainer_main

        with open(log, "w") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
            return _Finished(trainer_main([*self.command(a)[len(self.trainer) :], "--device", device]))

    def wait(self) -> None:
        while self.procs and all(p.popen.poll() is None for p in self.procs.values()):
            time.sleep(0.1)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.popen.poll() is None and p.popen.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        self.procs.clear()


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
