"""`amlfs-trainer`: train one sample of one epoch. The single contract between the operator (pods) and the
local runner (subprocesses): the same flags, or the same AMLFS_* environment variables.

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

EXIT_OK, EXIT_CONFIG, EXIT_TRANSIENT = 0, 2, 3
log = logging.getLogger("amlfs-trainer")


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="amlfs-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--spec", default=_env("AMLFS_SPEC"), help="LossSearch spec as JSON, or @FILE (env AMLFS_SPEC)")
    p.add_argument("--search", default=_env("AMLFS_SEARCH", "search"), help="search name (env AMLFS_SEARCH)")
    p.add_argument("--namespace", default=_env("AMLFS_NAMESPACE", "default"), help="env AMLFS_NAMESPACE")
    p.add_argument("--epoch", default=_env("AMLFS_EPOCH"), help="0-based epoch (env AMLFS_EPOCH)")
    p.add_argument("--sample", default=_env("AMLFS_SAMPLE"), help="sample index (env AMLFS_SAMPLE)")
    p.add_argument("--attempt", default=_env("AMLFS_ATTEMPT", "0"), help="attempt number (env AMLFS_ATTEMPT)")
    p.add_argument("--theta", default=_env("AMLFS_THETA"), help="the sample's theta as a JSON list (env AMLFS_THETA)")
    p.add_argument(
        "--start", default=_env("AMLFS_START"), help="start checkpoint URI; empty at epoch 0 (env AMLFS_START)"
    )
    p.add_argument("--start-sha256", default=_env("AMLFS_START_SHA256"), help="expected sha256 of --start")
    p.add_argument(
        "--output",
        default=_env("AMLFS_OUTPUT"),
        help="output prefix URI for checkpoint.pt and result.json (env AMLFS_OUTPUT)",
    )
    p.add_argument("--device", default=_env("AMLFS_DEVICE", "auto"), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--metrics-port", default=_env("AMLFS_METRICS_PORT", "0"), help="serve /metrics (0: off)")
    p.add_argument("--pushgateway", default=_env("AMLFS_PUSHGATEWAY"), help="Pushgateway URL for the result")
    p.add_argument("--cache-dir", default=_env("AMLFS_CACHE_DIR"), help="dataset cache directory")
    return p


class UsageError(Exception):
    pass


def _int(value: str, flag: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: expected an integer, got {value!r}") from None
    if n < 0:
        raise UsageError(f"{flag}: must be >= 0, got {n}")
    return n


def _load_spec_text(value: str) -> str:
    if not value:
        raise UsageError("--spec: missing; pass the LossSearch spec as JSON or @FILE (or set AMLFS_SPEC)")
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"--spec: cannot read {value[1:]} ({exc.strerror})") from None
    return value


def build_job(args: argparse.Namespace) -> Any:
    from amlfs import storage
    from amlfs.core import program_for
    from amlfs.spaces import SpaceConfig, get_space
    from amlfs.spec import SpecError, spec_from_json
    from amlfs_trainer.train import SampleJob

    try:
        spec = spec_from_json(_load_spec_text(args.spec), "--spec")
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    epoch, sample = _int(args.epoch, "--epoch"), _int(args.sample, "--sample")
    if not args.output:
        raise UsageError("--output: missing; pass the prefix URI for checkpoint.pt and result.json")
    try:
        storage.parse(args.output)
        if args.start:
            storage.parse(args.start)
    except ValueError as exc:
        raise UsageError(f"--output/--start: {exc}") from None
    cfg = SpaceConfig.from_spec(spec)
    space = get_space(spec.search.space)
    if args.theta:
        try:
            theta = [float(v) for v in json.loads(args.theta)]
        except (ValueError, TypeError):
            raise UsageError(f"--theta: expected a JSON list of numbers, got {args.theta[:60]!r}") from None
    else:
        theta = space.identity(cfg)
    if len(theta) != space.dim(cfg):
        raise UsageError(
            f"--theta: {len(theta)} numbers, the {space.name}/{cfg.parameterization} space with "
            f"M={cfg.intervals} needs {space.dim(cfg)}"
        )
    return SampleJob(
        spec=spec,
        search=args.search,
        epoch=epoch,
        sample=sample,
        theta=theta,
        program=program_for(spec, theta),
        output=storage.normalize(args.output),
        start=storage.normalize(args.start) if args.start else "",
        start_sha256=args.start_sha256,
        attempt=_int(args.attempt, "--attempt"),
        namespace=args.namespace,
        device=args.device,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"amlfs-trainer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _run(args: argparse.Namespace) -> int:
    from amlfs import storage
    from amlfs_trainer.data import DataError
    from amlfs_trainer.metrics import TrainerMetrics, push_result
    from amlfs_trainer.models import ModelError
    from amlfs_trainer.train import ConfigError, run_sample, threads_from_env

    job = build_job(args)
    threads_from_env()
    port = _int(args.metrics_port, "--metrics-port")
    try:
        job.metrics = TrainerMetrics(job.search, job.epoch, job.sample, port)
    except OSError as exc:  # e.g. host networking with several trainers: train anyway, without /metrics
        log.warning("--metrics-port %d: cannot listen (%s); serving no live metrics", port, exc.strerror)
        job.metrics = TrainerMetrics(job.search, job.epoch, job.sample, 0)
    try:
        result = run_sample(job)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"amlfs-trainer: error: {exc}", file=sys.stderr)
        _termination_message(f"config error: {exc}")
        return EXIT_CONFIG
    except (storage.StorageError, OSError) as exc:
        print(f"amlfs-trainer: transient error: {exc}", file=sys.stderr)
        _termination_message(f"transient error: {exc}")
        return EXIT_TRANSIENT
    finally:
        job.metrics.close()
    if args.pushgateway:
        try:
            push_result(args.pushgateway, job.namespace, job.search, job.epoch, job.sample, result)
        except OSError as exc:  # the result is in storage anyway; the operator falls back to result.json
            log.warning("could not push the result to %s: %s", args.pushgateway, exc)
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
