"""Labels of the training data: class counts (for class-balanced losses)."""

from __future__ import annotations

import torch

from amlfs_trainer.data import TaskData


def class_counts(data: TaskData, split: str = "train") -> list[int]:
    """Examples per class in `split` (one pass over its labels)."""
    counts = torch.zeros(data.num_classes, dtype=torch.long)
    for _, y in data.eval_batches(split, 65536):
        counts += torch.bincount(y.cpu(), minlength=data.num_classes)
    return [int(c) for c in counts]
