"""Training the members of a pack: k >= 1 samples of one epoch, all from the same start state, in one process.

Two execution paths with the same results per member (each member's loss, data order and augmentation are its
own; the start-up is shared):

* `train_sequential`: one model. Before each member the model, optimizer and LR scheduler are reset to the start
  state, then the member trains and is evaluated exactly as in a process of its own (on the CPU: the same bytes).
  The CPU path: measured on CPU, vmap is no faster than this loop.
* `train_vectorized`: the k members as one stacked model (`torch.func.stack_module_state` + `functional_call` +
  `vmap`): one forward and one backward per step for all members, each on its own batch. The per-member losses
  are summed (not averaged: a mean would scale every member's gradient by 1/k); every member keeps its own
  buffers (BatchNorm running statistics); one optimizer over the stacked leaves equals k independent optimizers
  (elementwise updates, one shared LR schedule). No gradient clipping exists, so none has to be made per member.
  Results equal the sequential path's to float tolerance (the batched kernels round differently).

A member whose loss or parameters become non-finite ends without a reward, alone: in the vectorised path it is
masked out of the summed loss and its slices are reset to finite values (frozen) so that it cannot disturb its
pack-mates; they go on. Finiteness is checked every `CHECK_EVERY` steps and at the end, as in a solo run.

Retrieval and verification packs always take the sequential path (train.py falls back): the vectorised path's
evaluation is classification's (accuracy and cross-entropy of the stacked heads).

Evaluation (both paths) runs in inference mode in float32 without autocast or TF32, so that rewards do not depend
on the device's reduced-precision modes.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amlfs.spec import OptimizerSpec
from amlfs_trainer.data import TaskData
from amlfs_trainer.hardware import exact_fp32
from amlfs_trainer.metrics import MemberGauges
from amlfs_trainer.optim import MIN_BATCH, build_optimizer, build_scheduler

CHECK_EVERY = 50  # steps between host syncs (finite-loss check, metrics)
PATHS = ("sequential", "vectorized")


@dataclass
class Start:
    """The shared start-up of an invocation: the model, optimizer and scheduler holding the start state, and the
    data. The start state is copied at construction; `reset` puts it back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data: TaskData
    device: torch.device
    amp: bool  # bf16 autocast in training
    optimizer_spec: OptimizerSpec
    epochs: int  # the LR schedule spans them (the search's epochs when it began: optim.schedule_epochs)
    per_epoch: int  # optimizer steps per epoch
    batch_size: int
    eval_batch_size: int
    logit_scale: float  # evaluation: logits = scale * head output (cosine head), 1 otherwise
    # the task kind's evaluation (model, data, eval batch size, logit scale) -> named metrics; None: classification
    evaluator: Callable[[nn.Module, TaskData, int, float], dict[str, float]] | None = None
    saved: tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.saved = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            copy.deepcopy(self.optimizer.state_dict()),
            copy.deepcopy(self.scheduler.state_dict()),
        )

    def reset(self) -> None:
        self.model.load_state_dict(self.saved[0])
        self.optimizer.load_state_dict(copy.deepcopy(self.saved[1]))
        self.scheduler.load_state_dict(copy.deepcopy(self.saved[2]))


@dataclass
class Member:
    sample: int
    criterion: nn.Module
    seed: Callable[[], torch.Generator]  # seeds the process RNGs for this member, returns its data generator
    gauges: MemberGauges | None = None


@dataclass
class Outcome:
    """One member's epoch. `state` (model, optimizer, scheduler) is None without a reward; in the
    sequential path its tensors are the live model's, valid until the next outcome is produced."""

    sample: int
    finite: bool
    steps: int
    examples: int
    train_loss: float
    metrics: dict[str, float]  # classification: valAccuracy, valLoss, testAccuracy, testLoss; else the kind's
    state: dict[str, Any] | None
    timings: dict[str, float]  # firstStep (part of train), train, eval


def choose_path(mode: str, device: torch.device, k: int) -> str:
    """`auto`: vectorised for k > 1 on CUDA; sequential on the CPU (measured: vmap gains nothing there)."""
    if mode == "auto":
        return "vectorized" if device.type == "cuda" and k > 1 else "sequential"
    if mode not in PATHS:
        raise ValueError(f"pack mode must be auto or one of {PATHS}, got {mode!r}")
    return mode


def train_batches(data: TaskData, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """The member's epoch; a trailing batch of fewer than MIN_BATCH examples is dropped (deterministically)."""
    for x, y in data.train_batches(batch_size, generator):
        if y.shape[0] >= MIN_BATCH:
            yield x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- sequential --------------------------------------------------------------------------------------------


def train_sequential(start: Start, members: list[Member]) -> Generator[Outcome, None, None]:
    for m in members:
        start.reset()
        generator = m.seed()
        t0 = time.perf_counter()
        loss, steps, seen, finite, first = _train_one(start, m, generator)
        _sync(start.device)
        timings = {"firstStep": first, "train": time.perf_counter() - t0}
        metrics: dict[str, float] = {}
        state = None
        if finite:
            t1 = time.perf_counter()
            if start.evaluator is not None:
                metrics = start.evaluator(start.model, start.data, start.eval_batch_size, start.logit_scale)
            else:
                metrics = classification_metrics(*(evaluate(start, split) for split in ("val", "test")))
            timings["eval"] = time.perf_counter() - t1
            state = {
                "model": start.model.state_dict(),
                "optimizer": start.optimizer.state_dict(),
                "scheduler": start.scheduler.state_dict(),
            }
        yield Outcome(m.sample, finite, steps, seen, loss, metrics, state, timings)


def _train_one(start: Start, m: Member, generator: torch.Generator) -> tuple[float, int, int, bool, float]:
    """(mean loss, steps, examples, finite, seconds of the first step). Host syncs every CHECK_EVERY steps."""
    model, optimizer, scheduler, device = start.model, start.optimizer, start.scheduler, start.device
    model.train()
    window_loss = torch.zeros((), device=device)
    total_loss = 0.0
    steps = seen = window_n = 0
    first = 0.0
    t0 = t_window = time.perf_counter()
    for x, y in train_batches(start.data, start.batch_size, generator):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=start.amp):
            out = model(x)
        loss = m.criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        window_loss += loss.detach()
        steps += 1
        window_n += 1
        seen += y.shape[0]
        if steps == 1:
            _sync(device)
            first = time.perf_counter() - t0
        if steps % CHECK_EVERY == 0 or steps == start.per_epoch:
            wl = window_loss.item()
            if not math.isfinite(wl):
                return float("nan"), steps, seen, False, first
            total_loss += wl
            t_window = _report(m.gauges, wl, window_n, steps, start, t_window)
            window_loss.zero_()
            window_n = 0
    wl = window_loss.item()
    total_loss += wl
    finite = math.isfinite(total_loss) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if m.gauges is not None:
        m.gauges.progress.set(1.0)
    return (total_loss / max(steps, 1)) if finite else float("nan"), steps, seen, finite, first


def _report(gauges: MemberGauges | None, wl: float, n: int, steps: int, start: Start, t_window: float) -> float:
    now = time.perf_counter()
    if gauges is not None:
        gauges.loss.set(wl / n)
        gauges.throughput.set(n * start.batch_size / max(now - t_window, 1e-9))
        gauges.progress.set(min(1.0, steps / start.per_epoch))
        gauges.steps.inc(n)
    return now


# accuracy, mean cross-entropy, balanced accuracy (mean per-class recall), balanced cross-entropy (mean per class)
Score = tuple[float, float, float, float]


def evaluate(start: Start, split: str) -> Score:
    """(accuracy, mean cross-entropy, balanced accuracy, balanced cross-entropy) of the model on a split, in
    float32. For a cosine head the CE is computed on scale * cosine."""
    return evaluate_model(start.model, start.data, split, start.eval_batch_size, start.logit_scale)


def evaluate_model(model: nn.Module, data: TaskData, split: str, batch_size: int, logit_scale: float) -> Score:
    """`evaluate` for any model and data."""
    device = data.device
    model.eval()
    c = data.num_classes
    with exact_fp32(device):
        hits = torch.zeros(c, device=device, dtype=torch.long)
        counts = torch.zeros(c, device=device, dtype=torch.long)
        loss_sum = torch.zeros(c, device=device)
        for x, y in data.eval_batches(split, batch_size):
            out = model(x).float() * logit_scale
            hits += torch.bincount(y[out.argmax(1) == y], minlength=c)
            counts += torch.bincount(y, minlength=c)
            loss_sum.scatter_add_(0, y, F.cross_entropy(out, y, reduction="none"))
    return _score(hits[None], counts, loss_sum[None])[0]


def _score(hits: Tensor, counts: Tensor, loss_sum: Tensor) -> list[Score]:
    """Per member scores from its per-class hits (k, C), the split's class counts (C,) and per-class summed
    losses (k, C)."""
    n = int(counts.sum())
    if n == 0:
        return [(math.nan, math.nan, math.nan, math.nan)] * hits.shape[0]
    present = counts > 0  # a class absent from the split has no recall: it does not count
    recall = (hits[:, present].double() / counts[present].double()).mean(1)
    class_loss = (loss_sum[:, present].double() / counts[present].double()).mean(1)
    return [
        (h / n, v / n, r, b)
        for h, v, r, b in zip(
            hits.sum(1).tolist(), loss_sum.double().sum(1).tolist(), recall.tolist(), class_loss.tolist(), strict=True
        )
    ]


def classification_metrics(val: Score, test: Score) -> dict[str, float]:
    return {
        "valAccuracy": val[0],
        "valLoss": val[1],
        "valBalancedAccuracy": val[2],
        "valBalancedLoss": val[3],
        "testAccuracy": test[0],
        "testLoss": test[1],
        "testBalancedAccuracy": test[2],
        "testBalancedLoss": test[3],
    }


# --- vectorised --------------------------------------------------------------------------------------------


class _Stack:
    """k copies of the start model as stacked leaves (dim 0 = member), with their own optimizer and scheduler
    holding the start state in every slice."""

    def __init__(self, start: Start, k: int) -> None:
        start.reset()
        model = start.model
        self.k = k
        self.start = start
        self.params, self.buffers = torch.func.stack_module_state([model] * k)
        named = dict(model.named_parameters())
        # the same grouping and order as the single model's optimizer, so optimizer state indices correspond
        self.optimizer = build_optimizer(start.optimizer_spec, [(self.params[n], p.ndim) for n, p in named.items()])
        self.scheduler = build_scheduler(start.optimizer_spec, self.optimizer, start.epochs, start.per_epoch)
        self.shapes = [p.shape for g in start.optimizer.param_groups for p in g["params"]]
        self.optimizer.load_state_dict(self._stacked_optimizer_state(start.optimizer.state_dict()))
        self.scheduler.load_state_dict(copy.deepcopy(start.scheduler.state_dict()))
        self.start_model = start.saved[0]

        def forward(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(model, (params, buffers), (x,))

        self.forward_each = torch.func.vmap(forward, in_dims=(0, 0, 0))  # each member its own batch
        self.forward_shared = torch.func.vmap(forward, in_dims=(0, 0, None))  # one batch for all members

    def _stacked_optimizer_state(self, sd: dict[str, Any]) -> dict[str, Any]:
        state: dict[int, dict[str, Any]] = {}
        for j, entry in sd["state"].items():
            shape = self.shapes[j]
            state[j] = {
                key: v.unsqueeze(0).repeat(self.k, *([1] * v.ndim))
                if isinstance(v, Tensor) and v.shape == shape and v.ndim > 0
                else copy.deepcopy(v)
                for key, v in entry.items()
            }
        return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}

    def _is_stacked(self, v: Any, j: int) -> bool:
        return isinstance(v, Tensor) and v.ndim == len(self.shapes[j]) + 1 and v.shape[1:] == self.shapes[j]

    def member_state(self, i: int) -> dict[str, Any]:
        """Member i as a single model's model/optimizer/scheduler state dicts (copies)."""
        model_sd = self.start.model.state_dict()
        stacked = {**self.params, **self.buffers}
        out: OrderedDict[str, Tensor] = OrderedDict((key, stacked[key][i].detach().clone()) for key in model_sd)
        out._metadata = getattr(model_sd, "_metadata", None)  # type: ignore[attr-defined]
        osd = self.optimizer.state_dict()
        state = {
            j: {key: v[i].clone() if self._is_stacked(v, j) else copy.deepcopy(v) for key, v in entry.items()}
            for j, entry in osd["state"].items()
        }
        return {
            "model": out,
            "optimizer": {"state": state, "param_groups": copy.deepcopy(osd["param_groups"])},
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
        }

    @torch.no_grad()
    def freeze(self, i: int) -> None:
        """Member i leaves the pack: its slices go back to finite start values and its optimizer state to zero,
        so that its (masked) remaining steps compute nothing non-finite."""
        for name, p in self.params.items():
            p[i].copy_(self.start_model[name])
        for name, b in self.buffers.items():
            b[i].copy_(self.start_model[name])
        stacked = (p for g in self.optimizer.param_groups for p in g["params"])
        for j, p in enumerate(stacked):
            for v in self.optimizer.state.get(p, {}).values():
                if self._is_stacked(v, j):
                    v[i].zero_()

    def finite(self) -> list[bool]:
        ok = torch.ones(self.k, dtype=torch.bool, device=self.start.device)
        for p in self.params.values():
            ok &= torch.isfinite(p.detach()).flatten(1).all(1)
        return [bool(v) for v in ok.tolist()]


def train_vectorized(start: Start, members: list[Member]) -> Generator[Outcome, None, None]:
    k, device = len(members), start.device
    stack = _Stack(start, k)
    generators = [m.seed() for m in members]
    live = torch.ones(k, dtype=torch.bool, device=device)
    ended: dict[int, tuple[int, int]] = {}  # member -> (steps, examples) when its loss went non-finite
    window_loss = torch.zeros(k, device=device)
    total = [0.0] * k
    steps = seen = window_n = 0
    first = 0.0
    start.model.train()
    t0 = t_window = time.perf_counter()
    for batch in zip(*(train_batches(start.data, start.batch_size, g) for g in generators), strict=True):
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=start.amp):
            out = stack.forward_each(stack.params, stack.buffers, x)
        losses = torch.stack([m.criterion(out[i], y[i]) for i, m in enumerate(members)])
        loss = torch.where(live, losses, 0.0).sum()
        stack.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stack.optimizer.step()
        stack.scheduler.step()
        window_loss += losses.detach()
        steps += 1
        window_n += 1
        seen += y.shape[1]
        if steps == 1:
            _sync(device)
            first = time.perf_counter() - t0
        if steps % CHECK_EVERY == 0 or steps == start.per_epoch:
            values = window_loss.tolist()
            for i, wl in enumerate(values):
                if i in ended:
                    continue
                if not math.isfinite(wl):
                    ended[i] = (steps, seen)
                    live[i] = False
                    stack.freeze(i)
                    continue
                total[i] += wl
                _report(members[i].gauges, wl, window_n, steps, start, t_window)
            t_window = time.perf_counter()
            window_loss.zero_()
            window_n = 0
    values = window_loss.tolist()
    params_finite = stack.finite()
    for i in range(k):
        if i not in ended:
            total[i] += values[i]
            if not (math.isfinite(total[i]) and params_finite[i]):
                ended[i] = (steps, seen)
    _sync(device)
    train_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores = {split: _evaluate_stack(stack, split) for split in ("val", "test")}
    eval_time = time.perf_counter() - t1
    timings = {"firstStep": first, "train": train_time, "eval": eval_time}
    for i, m in enumerate(members):
        if m.gauges is not None:
            m.gauges.progress.set(1.0)
        if i in ended:
            n_steps, n_seen = ended[i]
            yield Outcome(m.sample, False, n_steps, n_seen, float("nan"), {}, None, dict(timings))
            continue
        state = stack.member_state(i)
        mean = total[i] / max(steps, 1)
        metrics = classification_metrics(scores["val"][i], scores["test"][i])
        yield Outcome(m.sample, True, steps, seen, mean, metrics, state, dict(timings))


def _evaluate_stack(stack: _Stack, split: str) -> list[Score]:
    """Per member scores on a split (see `evaluate`), every member on the same batches, in float32."""
    start, k = stack.start, stack.k
    start.model.eval()
    c = start.data.num_classes
    with exact_fp32(start.device):
        hits = torch.zeros(k, c, device=start.device, dtype=torch.long)
        counts = torch.zeros(c, device=start.device, dtype=torch.long)
        loss_sum = torch.zeros(k, c, device=start.device)
        for x, y in start.data.eval_batches(split, start.eval_batch_size):
            out = stack.forward_shared(stack.params, stack.buffers, x).float() * start.logit_scale  # (k, B, C)
            hits.scatter_add_(1, y.expand(k, -1), (out.argmax(2) == y).long())
            counts += torch.bincount(y, minlength=c)
            rows = F.cross_entropy(out.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1)
            loss_sum.scatter_add_(1, y.expand(k, -1), rows)
    return _score(hits, counts, loss_sum)
