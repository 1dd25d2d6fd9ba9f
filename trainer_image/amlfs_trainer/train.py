"""One sample of one epoch: load the start checkpoint (or initialise from the seed), train one epoch with the
sample's loss, evaluate, write checkpoint.pt and result.json. Modelled on torchvision's reference
classification script, reduced to what a per-epoch search needs.

Randomness: the initial weights depend only on the search seed (identical for every sample of epoch 0). The
epoch's data order, augmentation and dropout are seeded afresh by every sample from (seed, epoch, sample) —
or (seed, epoch) with `search.commonRandomNumbers` in search mode, so that the B samples differ by their loss
alone — so every sample is reproducible on its own and no RNG state needs to travel in the checkpoint. The
model, optimizer and LR-scheduler states carry over between epochs through the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from amlfs import reinforce, storage
from amlfs.core import CHECKPOINT, RESULT
from amlfs.spec import LossSearchSpec, OptimizerSpec, SearchSpec
from amlfs_trainer.corruption import class_counts
from amlfs_trainer.data import TaskData, load_task
from amlfs_trainer.losses import build_loss
from amlfs_trainer.metrics import TrainerMetrics
from amlfs_trainer.models import build_model

CHECK_EVERY = 50  # steps between host syncs (finite-loss check, metrics)
_TASKS: dict[tuple[str, str], TaskData] = {}  # datasets loaded in this process (several samples in one process)


class ConfigError(Exception):
    """Invalid configuration or input: never retried. str() is one line naming the field and the fix."""


@dataclass
class SampleJob:
    spec: LossSearchSpec
    search: str
    epoch: int
    sample: int
    theta: list[float]
    program: dict[str, Any]
    output: str
    start: str = ""
    start_sha256: str = ""
    attempt: int = 0
    namespace: str = "default"
    device: str = "auto"
    cache_dir: Path | None = None
    metrics: TrainerMetrics | None = None
    timings: dict[str, float] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return dev


def sample_seed(search: SearchSpec, epoch: int, sample: int) -> int:
    """Seed of a sample's data order, augmentation and dropout. With common random numbers (search mode
    only) every sample of the epoch gets sample 0's seed; selection-only samples always differ."""
    if search.common_random_numbers and search.mode == "search":
        sample = 0
    digest = hashlib.sha256(f"amlfs-train:{search.seed}:{epoch}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(opt: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov and opt.momentum > 0)
    return torch.optim.AdamW(groups, lr=opt.lr)


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


def load_start(job: SampleJob, workdir: Path) -> dict[str, Any]:
    """Fetch and verify the start checkpoint. Missing/corrupt input is a ConfigError (exit 2)."""
    local = workdir / "start.pt"
    try:
        storage.download_file(job.start, local)
    except storage.NotFound:
        raise ConfigError(f"start checkpoint {job.start}: not found; check --start / AMLFS_START") from None
    if job.start_sha256:
        got = storage.sha256_file(local)
        if got != job.start_sha256:
            raise ConfigError(
                f"start checkpoint {job.start}: sha256 mismatch (expected {job.start_sha256[:12]}…, "
                f"got {got[:12]}…); the file is corrupt or was replaced — restore it from the "
                "epoch's best/ copy"
            )
    try:
        ckpt = torch.load(local, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise ConfigError(
            f"start checkpoint {job.start}: unreadable ({type(exc).__name__}); "
            "the file is corrupt — restore it from the epoch's best/ copy"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ConfigError(f"start checkpoint {job.start}: not an amlfs checkpoint (no model state)")
    if ckpt.get("epoch") != job.epoch:
        raise ConfigError(
            f"start checkpoint {job.start}: holds the state after epoch {ckpt.get('epoch')} "
            f"but --epoch is {job.epoch}; pass the checkpoint of epoch {job.epoch - 1}"
        )
    return ckpt


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TaskData,
    split: str,
    batch_size: int,
    device: torch.device,
    amp: bool,
    logit_scale: float = 1.0,
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a split. For a cosine head CE is computed on scale * cosine."""
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device)
    n = 0
    for x, y in data.eval_batches(split, batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out = out.float() * logit_scale
        correct += (out.argmax(1) == y).sum()
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum")
        n += y.numel()
    if n == 0:
        return float("nan"), float("nan")
    return correct.item() / n, loss_sum.item() / n


def run_sample(job: SampleJob) -> dict[str, Any]:
    """Train one epoch for one sample; write checkpoint and result. Returns the result dict."""
    t0 = time.perf_counter()
    spec = job.spec
    device = pick_device(job.device)
    amp = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if job.epoch >= spec.search.epochs:
        raise ConfigError(
            f"--epoch {job.epoch}: the search has {spec.search.epochs} epochs (0-based index); "
            "raise spec.search.epochs or pass a smaller epoch"
        )
    if job.epoch > 0 and not job.start:
        raise ConfigError(f"--start: epoch {job.epoch} needs the previous epoch's best checkpoint")
    with tempfile.TemporaryDirectory(prefix="amlfs-trainer-") as tmp:
        work = Path(tmp)
        ckpt = load_start(job, work) if job.start else None

        data = _task_data(spec, device, job.cache_dir)
        seed_everything(spec.search.seed)  # identical initial weights for every sample of epoch 0
        model = build_model(spec.model, data.num_classes, data.input_shape).to(device)
        if device.type == "cuda" and len(data.input_shape) == 3:
            model = model.to(memory_format=torch.channels_last)
        per_epoch = max(1, math.ceil(data.size("train") / spec.task.batch_size))
        optimizer = build_optimizer(spec.optimizer, model)
        scheduler = build_scheduler(spec.optimizer, optimizer, spec.search.epochs, per_epoch)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        counts = class_counts(data) if "classBalance" in job.program else None
        criterion = build_loss(job.program, spec.model.head, spec.model.scale, class_counts=counts).to(device)
        job.timings["setup"] = time.perf_counter() - t0

        sseed = sample_seed(spec.search, job.epoch, job.sample)
        seed_everything(sseed)
        gen = torch.Generator().manual_seed(sseed)
        t1 = time.perf_counter()
        train_loss, steps, seen, finite = _train_epoch(
            job, model, data, criterion, optimizer, scheduler, gen, device, amp, per_epoch
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        job.timings["train"] = time.perf_counter() - t1
        throughput = seen / max(job.timings["train"], 1e-9)

        result: dict[str, Any] = {
            "search": job.search,
            "namespace": job.namespace,
            "epoch": job.epoch,
            "sample": job.sample,
            "attempt": job.attempt,
            "theta": job.theta,
            "program": job.program,
            "device": str(device),
            "steps": steps,
            "examples": seen,
            "throughput": throughput,
            "trainLoss": train_loss,
        }
        if not finite:
            result |= {
                "status": "no-reward",
                "reward": None,
                "message": "the loss or a parameter became non-finite; sample ended without reward",
            }
        else:
            t2 = time.perf_counter()
            scale = spec.model.scale if spec.model.head == "cosine" else 1.0
            val_acc, val_loss = evaluate(model, data, "val", spec.task.eval_batch_size, device, amp, scale)
            test_acc, test_loss = evaluate(model, data, "test", spec.task.eval_batch_size, device, amp, scale)
            job.timings["eval"] = time.perf_counter() - t2
            result |= {
                "status": "ok",
                "reward": reinforce.reward_value(spec.search.reward, val_acc, val_loss),
                "valAccuracy": val_acc,
                "valLoss": val_loss,
                "testAccuracy": test_acc,
                "testLoss": test_loss,
            }
            t3 = time.perf_counter()
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": job.epoch + 1,
                "search": job.search,
                "sample": job.sample,
                "theta": job.theta,
                "program": job.program,
                "spec": spec.model_dump(mode="json", by_alias=True),
            }
            local = work / CHECKPOINT
            buf = io.BytesIO()
            torch.save(state, buf)
            local.write_bytes(buf.getvalue())
            sha = storage.sha256_file(local)
            uri = storage.join(job.output, CHECKPOINT)
            storage.upload_file(local, uri)
            result |= {"checkpoint": uri, "sha256": sha, "checkpointBytes": local.stat().st_size}
            job.timings["save"] = time.perf_counter() - t3
        job.timings["total"] = time.perf_counter() - t0
        result["timings"] = dict(job.timings)
        # result.json last: its presence marks the sample as complete
        storage.write_bytes(storage.join(job.output, RESULT), (json.dumps(result, indent=1) + "\n").encode())
        return result


def _train_epoch(
    job: SampleJob,
    model: nn.Module,
    data: TaskData,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    gen: torch.Generator,
    device: torch.device,
    amp: bool,
    per_epoch: int,
) -> tuple[float, int, int, bool]:
    """Returns (mean loss, steps, examples, finite). Host syncs only every CHECK_EVERY steps."""
    model.train()
    window_loss = torch.zeros((), device=device)
    total_loss = 0.0
    steps = seen = window_n = 0
    t_window = time.perf_counter()
    for x, y in data.train_batches(job.spec.task.batch_size, gen):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        window_loss += loss.detach()
        steps += 1
        window_n += 1
        seen += y.shape[0]
        if steps % CHECK_EVERY == 0 or steps == per_epoch:
            wl = window_loss.item()
            if not math.isfinite(wl):
                return float("nan"), steps, seen, False
            total_loss += wl
            if job.metrics is not None:
                now = time.perf_counter()
                job.metrics.loss.set(wl / window_n)
                job.metrics.throughput.set(window_n * job.spec.task.batch_size / max(now - t_window, 1e-9))
                job.metrics.progress.set(min(1.0, steps / per_epoch))
                job.metrics.steps.inc(window_n)
                t_window = now
            window_loss.zero_()
            window_n = 0
    wl = window_loss.item()
    total_loss += wl
    finite = math.isfinite(total_loss) and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if job.metrics is not None:
        job.metrics.progress.set(1.0)
    return (total_loss / max(steps, 1)) if finite else float("nan"), steps, seen, finite


def _task_data(spec: LossSearchSpec, device: torch.device, cache_dir: Path | None) -> TaskData:
    key = (spec.task.model_dump_json(), str(device))
    if key not in _TASKS:
        _TASKS.clear()  # keep at most one dataset resident
        _TASKS[key] = load_task(spec.task, device, cache_dir)
    return _TASKS[key]


def threads_from_env() -> None:
    n = os.environ.get("AMLFS_THREADS")
    if n:
        torch.set_num_threads(int(n))
