"""Classification: validation accuracy (and cross-entropy) on held-out examples of the training classes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from amlfs import reinforce
from amlfs.spec import LossSearchSpec, TaskSpec
from amlfs_trainer.data import TaskData, load_task
from amlfs_trainer.tasks.base import Task


class Classification(Task):
    kind = "classification"

    def load(self, task: TaskSpec, device: torch.device, cache_dir: Path | None) -> TaskData:
        return load_task(task, device, cache_dir)

    def evaluate(self, model: nn.Module, data: TaskData, batch_size: int, logit_scale: float) -> dict[str, float]:
        from amlfs_trainer import pack

        val, test = (pack.evaluate_model(model, data, split, batch_size, logit_scale) for split in ("val", "test"))
        return pack.classification_metrics(val, test)

    def reward(self, spec: LossSearchSpec, metrics: dict[str, float]) -> float:
        return reinforce.reward_value(
            spec.search.reward,
            metrics["valAccuracy"],
            metrics["valLoss"],
            metrics["valBalancedAccuracy"],
            metrics.get("valBalancedLoss", math.nan),
        )
