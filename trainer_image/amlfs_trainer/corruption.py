"""Corrupted training data for robustness studies, and class counts.

`corrupt` applies `task.imbalance` and then `task.labelNoise` to the loaded training arrays (which the
validation split is carved from afterwards), never to the test arrays, so a search is rewarded on data as
corrupted as its training data and judged on clean, balanced test data. Both are pure functions of their
seeds.

* imbalance (long-tailed, exponential profile): class c of C keeps round(n ratio^(-c/(C-1))) examples (at
  least 1), a random subset of its own, where n is the smallest class count as loaded, so that the profile
  holds exactly whatever the loaded counts were.
* label noise: exactly round(rate n) examples, chosen at random, get a wrong label: symmetric draws it
  uniformly from the other C - 1 classes; pairflip maps c to c + 1 (mod C).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from amlfs.spec import ImbalanceSpec, LabelNoiseSpec, TaskSpec

if TYPE_CHECKING:  # data.py imports this module
    from amlfs_trainer.data import TaskData

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_test, y_test


def generator(purpose: str, seed: int) -> torch.Generator:
    """A generator of its own for each purpose: a bare manual_seed(seed) would replay the permutation that
    carves the validation split (task.splitSeed) and flip exactly the validation examples."""
    digest = hashlib.sha256(f"amlfs-{purpose}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def corrupt(arrays: Arrays, task: TaskSpec, num_classes: int) -> Arrays:
    """The arrays with the task's imbalance and label noise applied to the training part (see module doc)."""
    x, y, x_test, y_test = arrays
    if task.imbalance.ratio > 1.0:
        keep = long_tail_indices(y, num_classes, task.imbalance)
        x, y = x[keep], y[keep]
    if task.label_noise.rate > 0.0:
        y = noisy_labels(y, num_classes, task.label_noise)
    return x, y, x_test, y_test


def long_tail_counts(available: list[int], ratio: float) -> list[int]:
    """Examples kept per class: the exponential profile from the smallest available count."""
    n, c = min(available), len(available)
    if c == 1:
        return [n]
    return [max(1, round(n * ratio ** (-k / (c - 1)))) for k in range(c)]


def long_tail_indices(y: Tensor, num_classes: int, spec: ImbalanceSpec) -> Tensor:
    """Sorted indices of the examples a long-tailed subset keeps."""
    gen = generator("imbalance", spec.seed)
    by_class = [torch.nonzero(y == k).view(-1) for k in range(num_classes)]
    present = [k for k in range(num_classes) if len(by_class[k])]
    counts = long_tail_counts([len(by_class[k]) for k in present], spec.ratio)
    keep = [
        by_class[k][torch.randperm(len(by_class[k]), generator=gen)[:n]] for k, n in zip(present, counts, strict=True)
    ]
    return torch.cat(keep).sort().values


def noisy_labels(y: Tensor, num_classes: int, spec: LabelNoiseSpec) -> Tensor:
    """A copy of y with exactly round(rate len(y)) labels replaced by wrong ones."""
    gen = generator("label-noise", spec.seed)
    n_flip = round(spec.rate * len(y))
    idx = torch.randperm(len(y), generator=gen)[:n_flip]
    out = y.clone()
    if spec.type == "pairflip":
        out[idx] = (y[idx] + 1) % num_classes
    else:
        shift = torch.randint(1, num_classes, (n_flip,), generator=gen)
        out[idx] = (y[idx] + shift) % num_classes
    return out


def class_counts(data: TaskData, split: str = "train") -> list[int]:
    """Examples per class in `split` (from its labels alone)."""
    return [int(c) for c in torch.bincount(data.labels(split), minlength=data.num_classes)[: data.num_classes]]
