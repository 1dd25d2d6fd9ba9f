"""`amlfs-trainer`: train one sample of one epoch. The contract between the shells (the operator's pods, the
local runner's subprocesses) and this trainer is `amlfs.contract`: the same flags, or the same AMLFS_* variables.

Exit codes: 0 done (result.json written, with or without a reward); 2 invalid configuration or input, never
retried; 3 transient I/O failure, worth a retry. Anything else (a crash, an OOM kill) counts as a failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from amlfs import contract
from amlfs.contract import EXIT_CONFIG, EXIT_OK, EXIT_TRANSIENT, ConfigError

log = logging.getLogger("amlfs-trainer")


def parser() -> argparse.ArgumentParser:
    return contract.parser(os.environ, description=__doc__)


class UsageError(ConfigError):
    pass


def _load_spec_text(value: str) -> str:
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"--spec: cannot read {value[1:]} ({exc.strerror})") from None
    return value


def build_job(inv: contract.Invocation) -> Any:
    from amlfs import storage
    from amlfs.core import program_for
    from amlfs.spaces import SpaceConfig, get_space
    from amlfs.spec import SpecError, spec_from_json
    from amlfs_trainer.train import SampleJob

    try:
        spec = spec_from_json(_load_spec_text(inv.spec), "--spec")
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    if len(inv.members) != 1:
        raise UsageError(f"--members: {len(inv.members)} members; this trainer trains one sample per invocation")
    member = inv.members[0]
    try:
        storage.parse(member.output)
        if inv.start:
            storage.parse(inv.start)
    except ValueError as exc:
        raise UsageError(f"--output/--start: {exc}") from None
    cfg = SpaceConfig.from_spec(spec)
    space = get_space(spec.search.space)
    theta = list(member.theta) if member.theta else space.identity(cfg)
    if len(theta) != space.dim(cfg):
        raise UsageError(
            f"--theta: {len(theta)} numbers, the {space.name}/{cfg.parameterization} space with "
            f"M={cfg.intervals} needs {space.dim(cfg)}"
        )
    return SampleJob(
        spec=spec,
        search=inv.search,
        epoch=inv.epoch,
        sample=member.sample,
        theta=theta,
        program=program_for(spec, theta),
        output=storage.normalize(member.output),
        start=storage.normalize(inv.start) if inv.start else "",
        start_sha256=inv.start_sha256,
        attempt=inv.member_attempt(member),
        namespace=inv.namespace,
        device=inv.device,
        cache_dir=Path(inv.cache_dir) if inv.cache_dir else None,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parser().parse_args(argv)
    try:
        return _run(contract.from_args(args))
    except ConfigError as exc:
        print(f"amlfs-trainer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _run(inv: contract.Invocation) -> int:
    from amlfs import storage
    from amlfs_trainer.data import DataError
    from amlfs_trainer.metrics import TrainerMetrics, push_result
    from amlfs_trainer.models import ModelError
    from amlfs_trainer.train import ConfigError as TrainConfigError
    from amlfs_trainer.train import run_sample

    job = build_job(inv)
    if inv.threads:
        import torch

        torch.set_num_threads(inv.threads)
    port = inv.metrics_port
    try:
        job.metrics = TrainerMetrics(job.search, job.epoch, job.sample, port)
    except OSError as exc:  # e.g. host networking with several trainers: train anyway, without /metrics
        log.warning("--metrics-port %d: cannot listen (%s); serving no live metrics", port, exc.strerror)
        job.metrics = TrainerMetrics(job.search, job.epoch, job.sample, 0)
    try:
        result = run_sample(job)
    except (TrainConfigError, DataError, ModelError) as exc:
        print(f"amlfs-trainer: error: {exc}", file=sys.stderr)
        _termination_message(f"config error: {exc}")
        return EXIT_CONFIG
    except (storage.StorageError, OSError) as exc:
        print(f"amlfs-trainer: transient error: {exc}", file=sys.stderr)
        _termination_message(f"transient error: {exc}")
        return EXIT_TRANSIENT
    finally:
        job.metrics.close()
    if inv.pushgateway:
        try:
            push_result(inv.pushgateway, job.namespace, job.search, job.epoch, job.sample, result)
        except OSError as exc:  # the result is in storage anyway; the operator falls back to result.json
            log.warning("could not push the result to %s: %s", inv.pushgateway, exc)
    summary = {k: result.get(k) for k in ("epoch", "sample", "status", "reward", "testAccuracy", "sha256")}
    print(json.dumps(summary))
    _termination_message(json.dumps(summary))
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
