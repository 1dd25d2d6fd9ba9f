"""`amlfs-trainer`: train a pack of k >= 1 samples of one epoch from one start checkpoint.

The contract between the shells (the operator's pods, `amlfs run`) and this trainer is `amlfs.contract`: the same
flags, or the same AMLFS_* environment variables. A pack of one: --sample, --theta, --output; a larger pack:
--members '[{"sample": 0, "theta": [...], "output": "s3://..."}, ...]'. Every member writes its own checkpoint.pt
and then result.json under its own output prefix.

Exit codes: 0 done (every member's result.json written, with or without a reward); 2 invalid configuration or
input, never retried, nothing written; 3 transient I/O failure, worth a retry (members whose result.json exists
are complete). Anything else (a crash, an OOM kill) counts as a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amlfs import contract
from amlfs.contract import EXIT_CONFIG, EXIT_OK, EXIT_TRANSIENT, ConfigError
from amlfs_trainer.job import PackJob, UsageError, build_job

__all__ = ["EXIT_CONFIG", "EXIT_OK", "EXIT_TRANSIENT", "UsageError", "main", "parser", "run"]
log = logging.getLogger("amlfs-trainer")


def parser() -> argparse.ArgumentParser:
    return contract.parser(os.environ, description=__doc__)


def process_age() -> float | None:
    """Seconds since this process started (the interpreter's own start-up included); None off Linux."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    """The trainer; `argv` None: this process's command line (then the process's own start-up is timed too)."""
    started = time.perf_counter()
    age = process_age() if argv is None else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parser().parse_args(argv)
    try:
        job = build_job(contract.from_args(args))
        if age is not None:
            job.timings["startup"] = age
        return run(job, started)
    except ConfigError as exc:
        print(f"amlfs-trainer: error: {exc}", file=sys.stderr)
        _termination_message(f"config error: {exc}")
        return EXIT_CONFIG


def run(job: PackJob, started: float, on_result: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Train a validated job; `on_result` is called with each member's result once its result.json is written.
    Returns EXIT_OK or EXIT_TRANSIENT; raises ConfigError for invalid input."""
    t = time.perf_counter()
    from amlfs import storage
    from amlfs_trainer.hardware import set_threads
    from amlfs_trainer.metrics import TrainerMetrics, push_result
    from amlfs_trainer.train import run_pack

    job.timings["import"] = time.perf_counter() - t
    set_threads(job.threads)
    port = job.metrics_port
    try:
        job.metrics = TrainerMetrics(job.search, job.epoch, job.samples, port)
    except OSError as exc:  # e.g. host networking with several trainers: train anyway, without /metrics
        log.warning("--metrics-port %d: cannot listen (%s); serving no live metrics", port, exc.strerror)
        job.metrics = TrainerMetrics(job.search, job.epoch, job.samples, 0)
    summaries = []
    try:
        for result in run_pack(job, started):
            if job.pushgateway:
                try:
                    push_result(job.pushgateway, job.namespace, job.search, job.epoch, result["sample"], result)
                except OSError as exc:  # the result is in storage anyway; the operator falls back to result.json
                    log.warning("could not push the result to %s: %s", job.pushgateway, exc)
            summary = {k: result.get(k) for k in ("epoch", "sample", "status", "reward", "testAccuracy", "sha256")}
            # what the reward is, and the retrieval counterparts of testAccuracy
            summary |= {k: result[k] for k in ("rewardMetric", "testMAP", "testRank1") if k in result}
            print(json.dumps(summary), flush=True)
            summaries.append(summary)
            if on_result is not None:
                on_result(result)
    except (storage.StorageError, OSError) as exc:
        print(f"amlfs-trainer: transient error: {exc}", file=sys.stderr)
        _termination_message(f"transient error: {exc}")
        return EXIT_TRANSIENT
    finally:
        job.metrics.close()
    _termination_message(json.dumps(summaries[0] if len(summaries) == 1 else summaries))
    return EXIT_OK


def _termination_message(text: str) -> None:
    """Kubernetes reads /dev/termination-log (or AMLFS_TERMINATION_LOG) into the container status."""
    path = os.environ.get("AMLFS_TERMINATION_LOG", "/dev/termination-log")
    if "AMLFS_TERMINATION_LOG" not in os.environ and not os.path.exists(path):
        return  # not in a pod: do not create files in /dev
    try:
        with open(path, "w") as f:
            f.write(text[:4000])
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
