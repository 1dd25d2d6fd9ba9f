"""The machine the trainer runs on: the device (explicit, failing fast), the precision it trains and evaluates
in, and how many CPU threads torch may use (the process's CPU quota, not the node's core count)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from amlfs.contract import ConfigError

log = logging.getLogger("amlfs-trainer")
CGROUP = Path("/sys/fs/cgroup")


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when usable, else CPU), `cpu`, `cuda` or `cuda:N`. An explicit CUDA device that cannot be
    used is a ConfigError (one line, exit 2) instead of a silent fall-back to the CPU. The chosen CUDA device
    becomes the current one."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        try:
            return _init_cuda(torch.device("cuda"))
        except RuntimeError as exc:
            log.warning("CUDA is present but unusable (%s); training on the CPU", _one_line(exc))
            return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"--device {name}: unsupported device type; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: CUDA was requested but is not available here (no GPU, or no driver); "
            "check the pod's nvidia.com/gpu resource, or use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s); use cuda:0..cuda:{count - 1}")
    try:
        return _init_cuda(dev)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: CUDA was requested but is unusable ({_one_line(exc)})") from None


def _init_cuda(dev: torch.device) -> torch.device:
    dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    torch.cuda.set_device(dev)
    torch.zeros(1, device=dev).add_(1)  # a real kernel: a broken driver or a busy-exclusive GPU fails here
    return dev


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast only where the GPU computes it natively (compute capability >= 8.0); fp32 elsewhere."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def configure(device: torch.device, cudnn_benchmark: bool) -> None:
    """Process-wide numerics for training: TF32 matmuls/convolutions on CUDA, cudnn.benchmark as asked."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        set_tf32(True)


def set_tf32(on: bool) -> None:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # the API of recent torch; never mix the two
        value = "tf32" if on else "ieee"
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value  # type: ignore[attr-defined]
    else:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """Evaluation numerics: inference mode, no autocast, no TF32, so a reward does not depend on the GPU."""
    if device.type == "cuda":
        set_tf32(False)
    try:
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            yield
    finally:
        if device.type == "cuda":
            set_tf32(True)


def cpu_quota(root: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU quota (v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded down, at least 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(root)
    return max(1, min(n, math.floor(quota))) if quota is not None else max(1, n)


def _cgroup_quota(root: Path) -> float | None:
    try:
        parts = (root / "cpu.max").read_text().split()
        if parts and parts[0] != "max":
            return int(parts[0]) / int(parts[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def set_threads(requested: int) -> int:
    """torch's intra-op threads: `requested`, or the CPU quota when 0. Returns the number set."""
    n = requested or cpu_quota()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
