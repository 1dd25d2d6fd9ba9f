"""One invocation of the trainer: a pack of k >= 1 members (samples) of one epoch, all from the same start
checkpoint. The start-up (imports, data, model, start checkpoint) is paid once; each member then trains one epoch
with its own loss, is evaluated, and writes its own checkpoint.pt and then result.json under its own output
prefix, exactly as a sample trained alone. `amlfs_trainer.pack` holds the two execution paths (sequential,
vectorised); this module is the orchestration. Modelled on torchvision's reference classification script,
reduced to what a per-epoch search needs.

Randomness: the initial weights depend only on the search seed (identical for every sample of epoch 0). A
member's data order, augmentation and dropout are seeded afresh from (seed, epoch, sample) (`member_seed`) — or
(seed, epoch) with `search.commonRandomNumbers` in search mode, so that the B samples differ by their loss alone —
so every sample is reproducible on its own, a pack member equals the same sample trained alone, and no RNG state
needs to travel in the checkpoint. The model, optimizer and LR-scheduler states carry over between epochs through
the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amlfs import storage
from amlfs.contract import CHECKPOINT, RESULT, STATUS_NO_REWARD, STATUS_OK, ConfigError
from amlfs.spec import LossSearchSpec, SearchSpec
from amlfs_trainer import pack
from amlfs_trainer.corruption import class_counts
from amlfs_trainer.data import TaskData
from amlfs_trainer.hardware import bf16_supported, configure, pick_device
from amlfs_trainer.job import MemberJob, PackJob
from amlfs_trainer.losses import build_loss
from amlfs_trainer.models import build_model
from amlfs_trainer.optim import (
    SCHEDULE_EPOCHS,
    build_optimizer,
    build_scheduler,
    follow_spec,
    model_params,
    schedule_epochs,
    train_steps,
)
from amlfs_trainer.tasks import get_task

__all__ = ["ConfigError", "member_seed", "run_pack", "sample_seed", "seed_everything"]

log = logging.getLogger("amlfs-trainer")
SHARED = ("startup", "import", "checkpoint", "data", "model", "setup")  # timings paid once per invocation
_TASKS: dict[tuple[str, str], TaskData] = {}  # datasets loaded in this process (invocations in one process)
_INVOCATIONS = 0  # invocations begun in this process (a long-lived worker runs many)


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


def member_seed(spec: LossSearchSpec, epoch: int, sample: int) -> Callable[[], torch.Generator]:
    """A member's randomness for the epoch: seeds the process RNGs and returns the generator of its data order and
    augmentation. Depends on (search seed, epoch, sample) alone (see `sample_seed`)."""

    def seed() -> torch.Generator:
        s = sample_seed(spec.search, epoch, sample)
        seed_everything(s)
        return torch.Generator().manual_seed(s)

    return seed


def load_start(job: PackJob, workdir: Path) -> dict[str, Any]:
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


TRAINING_SPEC = {"task", "model", "optimizer", "search"}


def run_pack(job: PackJob, started: float | None = None) -> Iterator[dict[str, Any]]:
    """Train every member; yield each member's result once its checkpoint.pt and result.json are written.

    `started` (perf_counter) is when the invocation began (default: now); a member's `timings.total` runs from
    there to its result.json.
    """
    global _INVOCATIONS
    t0 = time.perf_counter() if started is None else started
    t_run = time.perf_counter()
    _INVOCATIONS += 1
    spec = job.spec
    device = pick_device(job.device)
    configure(device, job.cudnn_benchmark)
    amp = bf16_supported(device)
    task = get_task(spec.task.kind)
    with tempfile.TemporaryDirectory(prefix="amlfs-trainer-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        ckpt = load_start(job, work) if job.start else None
        job.timings["checkpoint"] = time.perf_counter() - t

        t = time.perf_counter()
        data = _task_data(spec, device, job.cache_dir)
        job.timings["data"] = time.perf_counter() - t

        t = time.perf_counter()
        seed_everything(spec.search.seed)  # identical initial weights for every sample of epoch 0
        model = build_model(spec.model, data.num_classes, data.input_shape).to(device)
        if device.type == "cuda" and len(data.input_shape) == 3:
            model = model.to(memory_format=torch.channels_last)
        per_epoch = max(1, train_steps(data.size("train"), spec.task.batch_size))
        optimizer = build_optimizer(spec.optimizer, model_params(model))
        horizon = schedule_epochs(ckpt, spec.search.epochs)
        scheduler = build_scheduler(spec.optimizer, optimizer, horizon, per_epoch)
        criteria = [_criterion(m, spec, data, device) for m in job.members]
        job.timings["model"] = time.perf_counter() - t

        if ckpt is not None:
            t = time.perf_counter()
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            follow_spec(spec.optimizer, optimizer, scheduler)
            job.timings["checkpoint"] += time.perf_counter() - t
        start = pack.Start(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            data=data,
            device=device,
            amp=amp,
            optimizer_spec=spec.optimizer,
            epochs=horizon,
            per_epoch=per_epoch,
            batch_size=spec.task.batch_size,
            eval_batch_size=spec.task.eval_batch_size,
            logit_scale=spec.model.scale if spec.model.head == "cosine" else 1.0,
            evaluator=None if task.kind == "classification" else task.evaluate,
        )
        del ckpt
        job.timings["setup"] = time.perf_counter() - t_run
        members = [
            pack.Member(
                m.sample,
                crit,
                member_seed(spec, job.epoch, m.sample),
                job.metrics.member(m.sample) if job.metrics is not None else None,
            )
            for m, crit in zip(job.members, criteria, strict=True)
        ]
        path = pack.choose_path(job.pack_mode, device, len(members))
        info: dict[str, Any] = {"size": len(members), "mode": path, "samples": job.samples}
        if path == "vectorized" and task.kind != "classification":
            path = "sequential"
            info |= {
                "mode": path,
                "fallback": f"{task.kind} packs train sequentially (the vectorised path evaluates classification only)",
            }
        outcomes: Iterator[pack.Outcome]
        if path == "vectorized":
            vectorized = pack.train_vectorized(start, members)
            try:
                outcomes = itertools.chain([next(vectorized)], vectorized)
            except RuntimeError as exc:  # an operator vmap cannot batch, or out of memory for k members
                if job.pack_mode != "auto":
                    raise
                vectorized.close()
                del vectorized
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("vectorised pack failed (%s); training the members one by one", _one_line(exc))
                info |= {"mode": "sequential", "fallback": _one_line(exc)}
                outcomes = pack.train_sequential(start, members)
        else:
            outcomes = pack.train_sequential(start, members)
        for i, (m, outcome) in enumerate(zip(job.members, outcomes, strict=True)):
            assert outcome.sample == m.sample
            yield _write(job, m, outcome, work, device, amp, info | {"index": i}, t0, horizon, task.reward)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _criterion(m: MemberJob, spec: LossSearchSpec, data: TaskData, device: torch.device) -> torch.nn.Module:
    try:
        counts = class_counts(data) if "classBalance" in m.program or "logitAdjust" in m.program else None
        return build_loss(m.program, spec.model.head, spec.model.scale, class_counts=counts).to(device)
    except ValueError as exc:
        raise ConfigError(f"sample {m.sample}: its loss program is invalid ({exc})") from None


def _write(
    job: PackJob,
    m: MemberJob,
    outcome: pack.Outcome,
    work: Path,
    device: torch.device,
    amp: bool,
    pack_info: dict[str, Any],
    t0: float,
    horizon: int,
    reward_of: Callable[[LossSearchSpec, dict[str, float]], float],
) -> dict[str, Any]:
    """The member's checkpoint.pt, then its result.json (whose presence marks it complete)."""
    timings = dict(job.timings) | outcome.timings
    result: dict[str, Any] = {
        "search": job.search,
        "namespace": job.namespace,
        "epoch": job.epoch,
        "sample": m.sample,
        "attempt": m.attempt,
        "theta": m.theta,
        "output": m.output,
        "program": m.program,
        "device": str(device),
        "precision": "bf16-autocast" if amp else "fp32",
        "steps": outcome.steps,
        "examples": outcome.examples,
        "throughput": outcome.examples / max(outcome.timings["train"], 1e-9),
        "trainLoss": outcome.train_loss,
    }
    if not outcome.finite or outcome.state is None:
        result |= {
            "status": STATUS_NO_REWARD,
            "reward": None,
            "message": "the loss or a parameter became non-finite; sample ended without reward",
        }
    else:
        reward = reward_of(job.spec, outcome.metrics)
        result |= {"status": STATUS_OK, "reward": reward, "rewardMetric": job.spec.reward_metric, **outcome.metrics}
        t = time.perf_counter()
        state = {
            **outcome.state,
            "epoch": job.epoch + 1,
            SCHEDULE_EPOCHS: horizon,  # the next epochs keep this schedule whatever search.epochs becomes
            "search": job.search,
            "sample": m.sample,
            "theta": m.theta,
            "program": m.program,
            # what the training depends on; not how it ran (trainer pods, storage): the same training writes
            # the same bytes however it was packed or scheduled
            "spec": job.spec.model_dump(mode="json", by_alias=True, include=TRAINING_SPEC),
        }
        local = work / CHECKPOINT
        buf = io.BytesIO()
        torch.save(state, buf)
        local.write_bytes(buf.getvalue())
        sha = storage.sha256_file(local)
        uri = storage.join(m.output, CHECKPOINT)
        storage.upload_file(local, uri)
        result |= {"checkpoint": uri, "sha256": sha, "checkpointBytes": local.stat().st_size}
        timings["save"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    shared = [k for k in SHARED if k in timings]
    if pack_info["mode"] == "vectorized":
        shared += ["firstStep", "train", "eval"]
    result["timings"] = timings
    result["pack"] = pack_info | {"shared": shared}
    result["process"] = {"pid": os.getpid(), "invocation": _INVOCATIONS}
    storage.write_bytes(storage.join(m.output, RESULT), (json.dumps(result, indent=1) + "\n").encode())
    return result


def _task_data(spec: LossSearchSpec, device: torch.device, cache_dir: Path | None) -> TaskData:
    key = (spec.task.model_dump_json(), str(device))
    if key not in _TASKS:
        _TASKS.clear()  # keep at most one dataset resident
        _TASKS[key] = get_task(spec.task.kind).load(spec.task, device, cache_dir)
    return _TASKS[key]
