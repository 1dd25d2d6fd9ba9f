"""Prometheus metrics of one trainer run: live gauges on /metrics and each member's result pushed to a Pushgateway.

Names follow Prometheus conventions: `amlfs_` prefix, base units in the name, `_total` for counters.
Labels: search, epoch, sample (one set per member of the pack; plus namespace on pushed metrics, via the
grouping key of `amlfs.contract`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server

from amlfs.contract import PUSH_JOB, STATUS_OK, grouping_key

log = logging.getLogger(__name__)
LABELS = ("search", "epoch", "sample")


@dataclass
class MemberGauges:
    progress: Any
    loss: Any
    throughput: Any
    steps: Any


class TrainerMetrics:
    """Live gauges of every member of a pack (`sample` may be one index or a list), on one /metrics port."""

    def __init__(self, search: str, epoch: int, sample: int | Sequence[int], port: int = 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        samples = [sample] if isinstance(sample, int) else list(sample)
        progress = Gauge("amlfs_trainer_progress_ratio", "Fraction of the epoch trained.", LABELS, registry=r)
        loss = Gauge("amlfs_trainer_loss", "Mean training loss over the last reporting window.", LABELS, registry=r)
        throughput = Gauge(
            "amlfs_trainer_throughput_examples_per_second",
            "Training examples per second over the last reporting window.",
            LABELS,
            registry=r,
        )
        steps = Counter("amlfs_trainer_steps", "Optimizer steps taken.", LABELS, registry=r)
        self.members: dict[int, MemberGauges] = {}
        for s in samples:
            labels = {"search": search, "epoch": str(epoch), "sample": str(s)}
            self.members[s] = MemberGauges(
                progress.labels(**labels), loss.labels(**labels), throughput.labels(**labels), steps.labels(**labels)
            )
        self.server: Any = None
        if port:
            self.server, _ = start_http_server(port, addr="0.0.0.0", registry=r)

    def member(self, sample: int) -> MemberGauges:
        return self.members[sample]

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def push_result(gateway: str, namespace: str, search: str, epoch: int, sample: int, result: dict[str, Any]) -> None:
    """Push one member's outcome. The reward gauge is absent when the member produced no reward."""
    r = CollectorRegistry()
    if result.get("reward") is not None:
        Gauge(
            "amlfs_sample_reward", "The sample's reward (its validation metric: result.json rewardMetric).", registry=r
        ).set(result["reward"])
    for name, key, doc in (
        ("amlfs_sample_val_loss", "valLoss", "Validation cross-entropy."),
        ("amlfs_sample_test_accuracy_ratio", "testAccuracy", "Test accuracy (never the reward)."),
        ("amlfs_sample_train_loss", "trainLoss", "Mean training loss of the epoch."),
    ):
        if result.get(key) is not None:
            Gauge(name, doc, registry=r).set(result[key])
    if result.get("sha256"):
        Gauge(
            "amlfs_sample_checkpoint_info", "The sample's checkpoint digest (value 1).", ["sha256"], registry=r
        ).labels(sha256=result["sha256"]).set(1)
    if result.get("output"):  # which search and sample wrote it: the operator takes no namesake's result
        Gauge(
            "amlfs_sample_output_info", "The sample's output prefix in storage (value 1).", ["output"], registry=r
        ).labels(output=result["output"]).set(1)
    Gauge("amlfs_sample_diverged", "1 when the loss or gradient became non-finite.", registry=r).set(
        0 if result.get("status") == STATUS_OK else 1
    )
    Gauge("amlfs_sample_duration_seconds", "Wall time of the trainer run.", registry=r).set(
        result.get("timings", {}).get("total", 0.0)
    )
    Gauge("amlfs_sample_throughput_examples_per_second", "Training throughput.", registry=r).set(
        result.get("throughput", 0.0)
    )
    push_to_gateway(
        gateway, job=PUSH_JOB, registry=r, grouping_key=grouping_key(namespace, search, epoch, sample), timeout=10
    )
