"""Optimizer, learning-rate schedule and steps per epoch, shared by the single-model and the stacked paths.

The optimizer takes (tensor, ndim of one member's parameter) pairs: weight decay applies to weights (ndim > 1),
not to biases and norm parameters, whether a tensor holds one model's parameter or k members' stacked along a
new first dimension. SGD (momentum, Nesterov, weight decay) and AdamW are elementwise, so one optimizer over
stacked tensors equals k independent optimizers as long as the members share the schedule (they do).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from amlfs.spec import OptimizerSpec

MIN_BATCH = 2  # a trailing batch smaller than this is dropped: BatchNorm cannot normalise one example
SCHEDULE_EPOCHS = "scheduleEpochs"  # checkpoint key: the epochs the LR schedule spans


def train_steps(n: int, batch_size: int) -> int:
    """Optimizer steps in an epoch of n examples: full batches, plus the last partial one unless it is a
    single example."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= MIN_BATCH else 0)


def build_optimizer(opt: OptimizerSpec, params: Iterable[tuple[Tensor, int]]) -> torch.optim.Optimizer:
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for p, ndim in params:
        (no_decay if ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.momentum, 0.999))


def follow_spec(
    opt: OptimizerSpec, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> None:
    """Give a restored optimizer and scheduler the spec's hyper-parameters: load_state_dict brings back the
    peak LR (the scheduler's base_lrs), momentum and weight decay they were saved with, so an edited
    spec.optimizer would otherwise never apply. The edit takes effect from the next epoch, at the schedule's
    current position; an unchanged spec leaves every value as restored (the same products)."""
    scheduler.base_lrs = [opt.lr] * len(optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)  # what the scheduler's next step() would compute
    for g, decay in zip(optimizer.param_groups, (opt.weight_decay, 0.0), strict=True):
        g["initial_lr"] = opt.lr
        g["lr"] = opt.lr * factor
        g["weight_decay"] = decay
        if opt.name == "sgd":
            g["momentum"], g["nesterov"] = opt.momentum, opt.nesterov and opt.momentum > 0
        else:
            g["betas"] = (opt.momentum, g["betas"][1])
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def model_params(model: nn.Module) -> list[tuple[Tensor, int]]:
    return [(p, p.ndim) for p in model.parameters()]


def lr_factor(opt: OptimizerSpec, step: int, total: int, per_epoch: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` of `total` (warm-up, then the schedule)."""
    warm = int(opt.warmup_epochs * per_epoch)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if opt.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if opt.schedule == "step":
        return opt.gamma ** sum(progress >= m for m in opt.milestones)
    return 1.0


def build_scheduler(
    opt: OptimizerSpec, optimizer: torch.optim.Optimizer, epochs: int, per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = epochs * per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(opt, s, total, per_epoch))


def schedule_epochs(checkpoint: dict[str, Any] | None, epochs: int) -> int:
    """The epochs the LR schedule spans: `epochs` (search.epochs) for a search's first epoch, afterwards the span
    its checkpoints carry. Raising search.epochs later so never moves the schedule: the added epochs train at its
    final LR. A checkpoint without the key (written before it existed) spans the epochs of the spec it was
    written with, so its search continues without a jump either."""
    if checkpoint is None:
        return epochs
    stored = checkpoint.get(SCHEDULE_EPOCHS)
    if isinstance(stored, int) and stored >= 1:
        return stored
    written = (checkpoint.get("spec") or {}).get("search", {}).get("epochs")
    return written if isinstance(written, int) and written >= 1 else epochs
