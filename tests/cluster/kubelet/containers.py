"""Container processes: starting one (volumes, env, argv, mount wrapper, log file, own process group, death with the
kubelet), recording its exit (exit code, reason, termination message), killing a pod's processes, restart back-off."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .common import MAX_TERMINATION_MESSAGE, ConfigError, ImageNotFound, log, now_rfc3339
from .rest import ApiError
from .runtime import Container, PodRuntime


class ContainersMixin:
    """One container instance at a time: start, finish, kill."""

    # set by ProcessKubelet.__init__
    mount_namespaces: bool
    restart_backoff: tuple[float, float]
    _pdeathsig: list[str]

    def _start_container(self, rt: PodRuntime, c: Container) -> None:
        try:
            if not rt.prepared:
                self._prepare_volumes(rt)
                rt.prepared = True
            cenv = self._container_env(rt, c)
            env = self._base_env(rt, c)
            lookup = dict(cenv)
            env.update(cenv)
            argv = self._argv(c, lookup)
            cwd = c.spec.get("workingDir") or str(rt.dir / "work" / c.name)
            if shutil.which(argv[0], path=env.get("PATH")) is None and not os.path.isfile(os.path.join(cwd, argv[0])):
                start_error = f'exec: "{argv[0]}": executable file not found in $PATH'
            else:
                start_error = None
            if self.mount_namespaces and start_error is None:
                argv = self._mount_wrapper(c, self._container_mounts(rt, c), argv)
        except ImageNotFound as e:  # the first failed pull, then the kubelet's back-off between pulls
            pulled_before = c.reason in ("ErrImagePull", "ImagePullBackOff")
            c.state, c.reason, c.message = "waiting", "ImagePullBackOff" if pulled_before else "ErrImagePull", str(e)
            c.next_start = time.monotonic() + 1.0
            return
        except ConfigError as e:
            c.state, c.reason, c.message = "waiting", "CreateContainerConfigError", str(e)
            c.next_start = time.monotonic() + 1.0
            return
        except ApiError as e:
            c.state, c.reason, c.message = "waiting", "CreateContainerConfigError", str(e)
            c.next_start = time.monotonic() + 1.0
            return
        Path(cwd).mkdir(parents=True, exist_ok=True)
        c.term_file.write_text("")
        c.instances += 1
        c.started_at = now_rfc3339()
        c.popen = None
        if start_error is None:
            logfile = open(c.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
            try:
                # setpriv --pdeathsig: the process dies with the worker thread
                # (i.e. with the kubelet), even if Python is SIGKILLed.
                c.popen = subprocess.Popen(
                    [*self._pdeathsig, *argv],
                    env=env,
                    cwd=cwd,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as e:
                start_error = f"failed to start {argv[0]}: {e}"
            finally:
                logfile.close()
        if start_error is not None:
            c.state, c.exit_code, c.reason = "terminated", 128, "StartError"
            c.message = start_error
            c.finished_at = now_rfc3339()
            c.ever_ran = True
            c.log_path.write_text(start_error + "\n")
            return
        c.state, c.reason, c.message, c.exit_code = "running", "", "", None
        c.finished_at = None
        c.ever_ran = True
        log.info("started %s/%s pid %s: %s", rt.key, c.name, c.popen.pid, argv)

    def _finish_container(self, c: Container, default_code: int | None = None) -> None:
        """Record the exit of c's process (which must have ended)."""
        code = c.popen.poll() if c.popen is not None else None
        if code is None:
            code = default_code if default_code is not None else 137
        elif code < 0:
            code = 128 - code  # killed by signal N -> 128+N, like a container runtime
        if c.forced_exit is not None:
            code, c.forced_exit = c.forced_exit, None
        c.exit_code = code
        c.finished_at = now_rfc3339()
        c.state = "terminated"
        if c.forced_reason:
            c.reason, c.forced_reason = c.forced_reason, None
        else:
            c.reason = "Completed" if code == 0 else "Error"
        msg = ""
        with contextlib.suppress(OSError):
            msg = c.term_file.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        if not msg and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                tail = c.log_path.read_bytes()[-2048:].decode(errors="replace").splitlines()[-80:]
                msg = "\n".join(tail)
        c.message = msg

    def _kill_all(self, rt: PodRuntime, grace: float) -> None:
        running = [c for c in rt.all_containers() if c.popen is not None and c.popen.poll() is None]
        if not running:
            return
        sig = signal.SIGKILL if grace <= 0 else signal.SIGTERM
        for c in running:
            _signal_group(c.popen, sig)
        deadline = time.monotonic() + max(grace, 0) + 5
        for c in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.popen.wait(timeout=max(0.05, deadline - time.monotonic()))
            _signal_group(c.popen, signal.SIGKILL)

    def _restart_delay(self, c: Container) -> float:
        first, cap = self.restart_backoff
        return min(cap, first * (2 ** max(c.restart_count - 1, 0)))


def _signal_group(popen: subprocess.Popen | None, sig: int) -> None:
    if popen is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)
