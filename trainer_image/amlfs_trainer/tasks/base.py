"""The interface every task kind implements, and the open-set task data the non-classification kinds share.

A kind loads its data (a `TaskData` whose training split is labelled by training class or identity), evaluates a
trained model into named metrics (`valX` on the validation split, the reward's source; `testX` reported only)
and says which metric is the reward. Training is the same for every kind: the searched loss on the model's
(linear or cosine) head over the training labels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from amlfs.spec import LossSearchSpec, TaskSpec
from amlfs_trainer.data import TaskData
from amlfs_trainer.hardware import exact_fp32
from amlfs_trainer.models import Classifier

# result.json key of each reward metric (validation: "val" + key, test: "test" + key)
METRIC_KEYS = {"accuracy": "Accuracy", "mAP": "MAP", "rank1": "Rank1"}


class Task(ABC):
    kind: str

    @abstractmethod
    def load(self, task: TaskSpec, device: torch.device, cache_dir: Path | None) -> TaskData:
        """The task's data; a `DataError` (one line, exit 2) for missing or malformed files."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: TaskData, batch_size: int, logit_scale: float) -> dict[str, float]:
        """Named metrics of the trained model: valX (validation, the reward's source) and testX (reported)."""

    def reward(self, spec: LossSearchSpec, metrics: dict[str, float]) -> float:
        return metrics["val" + METRIC_KEYS[spec.task.reward_metric]]


@dataclass(frozen=True)
class Gallery:
    """Identities and cameras of the images of one evaluation set, in the order the set yields them."""

    ids: Tensor  # int64 (CPU)
    cams: Tensor  # int64 (CPU)


@dataclass(frozen=True)
class Pairs:
    """Pairs over the images of one evaluation set: indices into it, whether the two are one identity, the fold."""

    a: Tensor
    b: Tensor
    same: Tensor  # bool
    fold: Tensor  # int64, 0-based


@dataclass
class OpenSetData(TaskData):
    """Training images labelled by training identity, plus named evaluation sets (their images come from `inner`).

    Retrieval sets are "val-query", "val-gallery", "test-query", "test-gallery" (with `galleries`); verification
    sets are "val-pairs" and "test-pairs" (with `pairs`). Validation identities are training identities held out
    of training; test identities are never seen in training and never give a reward.
    """

    inner: TaskData
    galleries: dict[str, Gallery] = field(default_factory=dict)
    pairs: dict[str, Pairs] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.num_classes = self.inner.num_classes
        self.input_shape = self.inner.input_shape
        self.device = self.inner.device

    def size(self, split: str) -> int:
        return self.inner.size(split)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        return self.inner.train_batches(batch_size, generator)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        return self.inner.eval_batches(split, batch_size)


def embeddings(model: nn.Module, data: TaskData, split: str, batch_size: int) -> Tensor:
    """(N, D) embeddings of a set in float32, in its order: the model's `embed` (features before the head)."""
    assert isinstance(model, Classifier)
    model.eval()
    with exact_fp32(data.device):
        chunks = [model.embed(x).float() for x, _ in data.eval_batches(split, batch_size)]
    if not chunks:
        return torch.zeros(0, 0, device=data.device)
    return torch.cat(chunks)
