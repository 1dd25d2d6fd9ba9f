"""`python -m amlfs_trainer.worker`: a long-lived trainer that runs invocation after invocation in one process.

A fresh `amlfs-trainer` process pays its start-up (the interpreter, importing torch, loading the dataset, the first
model and optimizer) for every sample; a worker pays it once and then trains whatever it is given, each invocation
exactly as a fresh process would train it. `amlfs run` keeps one worker per device or `--parallel` slot.

Protocol: JSON lines. On stdin, one request per invocation:

    {"id": 7, "env": {"AMLFS_SPEC": "@/w/spec.json", "AMLFS_EPOCH": "1", ...},
     "log": "/w/logs/e0001-s02-a0.log", "sent": 1718000000.0}

`env` is the invocation spelled as the contract's AMLFS_* variables (`amlfs.contract.to_env`; nothing else is
accepted); `log` the file that the invocation's stdout and stderr are appended to (default: the worker's stderr);
`sent` (optional, epoch seconds) when the shell handed the invocation out: the wait until it starts is its
`startup` timing. On stdout, one message per line:

    {"event": "ready", "pid": 123, "protocol": 1}            once, when the imports are done
    {"event": "started", "id": 7, "mode": "sequential"}      the invocation is valid and begins (its pack path)
    {"event": "member", "id": 7, "sample": 2, "status": "ok", "reward": 0.93, "sha256": "..."}
                                                             that member's checkpoint.pt and result.json are written
    {"event": "done", "id": 7, "rc": 0, "message": ""}       the invocation ended with a trainer exit code

The exit codes are a fresh trainer's: 0 done, 2 invalid configuration or input (nothing written), 3 transient
storage failure (members already reported are complete), 1 any other exception (its traceback is in the log).
None of them ends the worker; requests are served one at a time, in order, and end of input ends the worker
(exit 0). A malformed request is answered with "done", rc 2.

Every invocation starts from a fresh process's state, so that its results (rewards, checkpoint bytes) are those
of a fresh `amlfs-trainer`: the Python and NumPy RNGs are reseeded from the OS (as at interpreter start), torch's
(CPU and CUDA) with this process's initial seed; torch's process-wide numerics (cudnn.benchmark and
deterministic, deterministic algorithms, TF32/fp32 precision, default dtype, grad mode) and the environment are
put back as they were when the worker started; the invocation's own thread count is set as a fresh process sets
it. Nothing built for an invocation (model, optimizer, scheduler, metrics server, start checkpoint) outlives it;
the only thing kept is the dataset (`train._TASKS`, keyed by the task spec and the device; batches are gathered
copies, so training never changes it). After each invocation the garbage is collected and CUDA's cache emptied.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import gc
import json
import logging
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np
import torch

from amlfs import contract
from amlfs.contract import EXIT_CONFIG, ConfigError
from amlfs_trainer import cli, hardware, pack, train  # noqa: F401  (train: imported once, here)
from amlfs_trainer.job import build_job

PROTOCOL = 1
EXIT_EXCEPTION = 1  # what an uncaught exception makes a fresh process exit with
Send = Callable[[dict[str, Any]], None]
log = logging.getLogger("amlfs-trainer")


# --- a fresh process's state ------------------------------------------------------------------------------

_TORCH_SEED = torch.initial_seed()  # this process's: nothing has seeded torch yet when the worker imports this
_FLAGS: list[tuple[Any, str]] = [
    (torch.backends.cudnn, "benchmark"),
    (torch.backends.cudnn, "deterministic"),
]
if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # the API `hardware.set_tf32` uses; never mix the two
    _conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]
    _FLAGS += [(torch.backends.cuda.matmul, "fp32_precision"), (_conv, "fp32_precision")]
else:
    _FLAGS += [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")]
_FRESH_FLAGS = [getattr(obj, name) for obj, name in _FLAGS]
_FRESH_DETERMINISTIC = (
    torch.are_deterministic_algorithms_enabled(),
    torch.is_deterministic_algorithms_warn_only_enabled(),
)
_FRESH_DTYPE = torch.get_default_dtype()
_FRESH_ENV = dict(os.environ)


def fresh_state(environment: bool = True) -> None:
    """Put back what a fresh trainer process starts with (see the module docstring); `environment` False: leave
    os.environ alone (when running inside another program, whose environment is its own)."""
    random.seed()
    np.random.seed()
    torch.manual_seed(_TORCH_SEED)  # also every CUDA device's generator
    for (obj, name), value in zip(_FLAGS, _FRESH_FLAGS, strict=True):
        if getattr(obj, name) != value:
            setattr(obj, name, value)
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
        _FRESH_DETERMINISTIC
    ):
        torch.use_deterministic_algorithms(_FRESH_DETERMINISTIC[0], warn_only=_FRESH_DETERMINISTIC[1])
    torch.set_default_dtype(_FRESH_DTYPE)
    torch.set_grad_enabled(True)
    if environment and os.environ != _FRESH_ENV:
        os.environ.clear()
        os.environ.update(_FRESH_ENV)


_frozen = False


def _tidy() -> None:
    """Free what the last invocation left in reference cycles (on a GPU: its memory) before the next one.

    What is alive at the first call (torch's and the interpreter's ~200k import-time objects, the cached
    dataset) is moved out of the collector's sight once with `gc.freeze`, so that every later collection scans
    only what the invocations since made: a full collection costs ~0.2 s otherwise, as much as an epoch of a
    small model's training."""
    global _frozen
    gc.collect()
    if not _frozen:
        gc.freeze()
        atexit.register(gc.unfreeze)  # the interpreter's shutdown frees them as usual
        _frozen = True
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --- one invocation ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _output_to(path: str, own_process: bool) -> Iterator[None]:
    """The invocation's stdout and stderr appended to `path`: the file descriptors (C-level output and a crash's
    traceback too) in a worker process, Python's sys.stdout/sys.stderr when running inside another program."""
    if not path:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if not own_process:
        with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield
        return
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for d in (fd, *saved):
            os.close(d)


def _request(request: Any) -> tuple[contract.Invocation, str, float | None]:
    if not isinstance(request, dict) or not isinstance(request.get("env"), dict):
        raise ConfigError('worker request: expected {"id", "env": {AMLFS_*: ...}, "log"}')
    env = request["env"]
    unknown = sorted(k for k in env if k not in contract.ENV_NAMES)
    if unknown:
        raise ConfigError(f"worker request: env.{unknown[0]} is not a variable of the trainer contract")
    if not all(isinstance(v, str) for v in env.values()):
        raise ConfigError("worker request: every env value must be a string")
    logfile = request.get("log") or ""
    sent = request.get("sent")
    if not isinstance(logfile, str) or (sent is not None and not isinstance(sent, int | float)):
        raise ConfigError('worker request: "log" must be a path, "sent" a number of seconds')
    return contract.from_env(env), logfile, sent


def serve(request: Any, send: Send, own_process: bool = True) -> int:
    """Run one request exactly as a fresh trainer process would; report through `send`; return the exit code.
    `own_process` False: inside another program (its output redirected at the Python level, its environment
    left alone)."""
    rid = request.get("id") if isinstance(request, dict) else None
    rc, message = EXIT_CONFIG, ""
    logfile = ""
    try:
        inv, logfile, sent = _request(request)
    except ConfigError as exc:
        send({"event": "done", "id": rid, "rc": EXIT_CONFIG, "message": str(exc)})
        return EXIT_CONFIG
    with _output_to(logfile, own_process):
        begun = time.time()
        started = time.perf_counter()
        fresh_state(environment=own_process)
        try:
            job = build_job(inv)
            if sent is not None:
                job.timings["startup"] = max(0.0, begun - sent)
            mode = pack.choose_path(job.pack_mode, hardware.pick_device(job.device), len(job.members))
            send({"event": "started", "id": rid, "mode": mode})

            def member(result: dict[str, Any]) -> None:
                keys = ("sample", "status", "reward", "sha256")
                send({"event": "member", "id": rid, **{k: result.get(k) for k in keys}})

            rc = cli.run(job, started, on_result=member)
        except ConfigError as exc:
            print(f"amlfs-trainer: error: {exc}", file=sys.stderr)
            rc, message = EXIT_CONFIG, str(exc)
        except Exception as exc:  # what would end a fresh process with a traceback ends only this invocation
            traceback.print_exc()
            rc, message = EXIT_EXCEPTION, f"{type(exc).__name__}: {exc}"[:500]
        finally:
            _tidy()
    send({"event": "done", "id": rid, "rc": rc, "message": message})
    return rc


# --- the process ------------------------------------------------------------------------------------------


def _protocol_channel() -> IO[str]:
    """The protocol's own copy of stdout; file descriptor 1 then points where stderr does, so that nothing the
    trainer prints can corrupt the protocol."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    return channel


def main() -> int:
    channel = _protocol_channel()
    faulthandler.enable()  # a hard crash writes its Python stack to fd 2: the invocation's log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def send(message: dict[str, Any]) -> None:
        try:
            channel.write(json.dumps(message) + "\n")
            channel.flush()
        except BrokenPipeError:  # the shell has gone: nobody is left to train for
            raise SystemExit(0) from None

    send({"event": "ready", "pid": os.getpid(), "protocol": PROTOCOL})
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError:
            send({"event": "done", "id": None, "rc": EXIT_CONFIG, "message": "worker request: not a JSON line"})
            continue
        serve(request, send)


if __name__ == "__main__":
    sys.exit(main())
