"""What a searched loss adds to a training step, versus plain cross-entropy.

Times a ResNet-20 (CIFAR-10 shapes) forward + backward + SGD step at --batch with

* ``ce``: ``F.cross_entropy``,
* ``amlfs``: the AM-LFS piecewise program at a random theta (M = 6, monotone, sigma = 0.2 around identity),
* ``search-softmax``: a Search-Softmax program (6 bins, random a <= 0),

and reports the median step time and ``overhead = t_loss / t_ce - 1``. On CUDA the step runs under bf16
autocast with channels_last, as the trainer does. It also times the loss alone (forward + backward on
random logits) and counts the aten operators one loss forward + backward dispatches (the launch count
that dominates a small loss on a GPU).

    python benchmarks/loss_overhead.py                    # CPU when there is no GPU, a few steps
    python benchmarks/loss_overhead.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from amlfs.spaces import SpaceConfig, get_space
from amlfs.spec import ModelSpec
from amlfs_trainer.losses import build_loss
from amlfs_trainer.models import build_model

NUM_CLASSES = 10
Loss = Callable[[Tensor, Tensor], Tensor]


def programs(head: str, scale: float, seed: int) -> dict[str, dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    cfg = SpaceConfig(6, "monotone", -1.0, 1.0, scale) if head == "cosine" else SpaceConfig(6, "monotone", -10.0, 10.0)
    amlfs = get_space("amlfs")
    mu = torch.tensor(amlfs.identity(cfg), dtype=torch.float64)
    theta = mu + 0.2 * torch.randn(mu.shape, generator=gen, dtype=torch.float64)
    a = (-torch.rand(6, generator=gen, dtype=torch.float64)).tolist()
    return {"amlfs": amlfs.program(theta.tolist(), cfg), "search-softmax": {"kind": "search-softmax", "a": a}}


def losses(head: str, scale: float, device: torch.device, seed: int) -> dict[str, Loss]:
    s = scale if head == "cosine" else 1.0
    out: dict[str, Loss] = {"ce": lambda z, y: F.cross_entropy(z.float() * s if s != 1.0 else z.float(), y)}
    for name, program in programs(head, scale, seed).items():
        out[name] = build_loss(program, head, scale).to(device)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def train_step_timings(args: argparse.Namespace, device: torch.device, crits: dict[str, Loss]) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model = build_model(ModelSpec(name="resnet20", head=args.head, scale=args.scale), NUM_CLASSES, (3, 32, 32))
    model = model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)

    def make_step(crit: Loss) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
                loss = crit(model(x), y)
            loss.backward()
            opt.step()

        return step

    steps = {name: make_step(crit) for name, crit in crits.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            time_steps(step, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so drifts of a shared machine hit every variant alike
        for name, step in steps.items():
            times[name].append(time_steps(step, device))
    return {name: statistics.median(t) for name, t in times.items()}


def loss_alone_timings(args: argparse.Namespace, device: torch.device, crits: dict[str, Loss]) -> dict[str, float]:
    gen = torch.Generator().manual_seed(args.seed)
    z0 = torch.randn(args.batch, NUM_CLASSES, generator=gen)
    if args.head == "cosine":
        z0 = torch.tanh(z0)
    z = z0.to(device).requires_grad_(True)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(device)
    reps = args.loss_reps

    def make(crit: Loss) -> Callable[[], None]:
        def run() -> None:
            for _ in range(reps):
                crit(z, y).backward()

        return run

    runs = {name: make(crit) for name, crit in crits.items()}
    for run in runs.values():
        time_steps(run, device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(5):
        for name, run in runs.items():
            times[name].append(time_steps(run, device) / reps)
    return {name: statistics.median(t) for name, t in times.items()}


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


_FREE = {
    "view",
    "_unsafe_view",
    "unsqueeze",
    "squeeze",
    "select",
    "slice",
    "unbind",
    "t",
    "expand",
    "detach",
    "alias",
    "as_strided",
    "_to_copy_noop",
}


def op_counts(args: argparse.Namespace, crits: dict[str, Loss]) -> dict[str, tuple[int, int]]:
    """(all aten ops, ops that are not pure views) of one loss forward + backward, on CPU."""
    cpu = losses(args.head, args.scale, torch.device("cpu"), args.seed)
    z = torch.randn(args.batch, NUM_CLASSES).requires_grad_(True)
    y = torch.randint(0, NUM_CLASSES, (args.batch,))
    out = {}
    for name in crits:
        cpu[name](z, y).backward()  # warm
        with _CountOps() as counter:
            cpu[name](z, y).backward()
        out[name] = (len(counter.ops), sum(op not in _FREE for op in counter.ops))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant (median); default 6 on CPU, 100 on CUDA"
    )
    parser.add_argument("--warmup", type=int, default=None, help="default 1 on CPU, 20 on CUDA")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--head", choices=("linear", "cosine"), default="linear")
    parser.add_argument("--scale", type=float, default=16.0)
    parser.add_argument("--loss-reps", type=int, default=None, help="loss-alone iterations per timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps if args.steps is not None else (100 if cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 1)
    args.loss_reps = args.loss_reps if args.loss_reps is not None else (200 if cuda else 50)
    if cuda:
        torch.backends.cudnn.benchmark = True

    crits = losses(args.head, args.scale, device, args.seed)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device {name}, torch {torch.__version__}, batch {args.batch}, head {args.head}, "
        f"{args.steps} timed steps (median), {'bf16 autocast + channels_last' if cuda else 'float32'}"
    )

    amlfs = crits["amlfs"]
    pieces = (
        "identity"
        if getattr(amlfs, "tau_identity", False)
        else "all positive"
        if getattr(amlfs, "tau_all_pos", False)
        else "ratio form"
        if getattr(amlfs, "tau_ratio", False)
        else "mixed"
    )
    print(f"amlfs program: M = 6, monotone, theta ~ N(identity, 0.2^2); tau pieces: {pieces}")
    step = train_step_timings(args, device, crits)
    alone = loss_alone_timings(args, device, crits)
    ops = op_counts(args, crits)
    print(f"{'loss':<16}{'step ms':>10}{'img/s':>10}{'overhead':>10}{'loss alone us':>15}{'aten ops (non-view)':>22}")
    for key in crits:
        over = 100.0 * (step[key] / step["ce"] - 1.0)
        print(
            f"{key:<16}{1e3 * step[key]:>10.2f}{args.batch / step[key]:>10.0f}{over:>+9.1f}%"
            f"{1e6 * alone[key]:>15.1f}{ops[key][0]:>14d} ({ops[key][1]})"
        )


if __name__ == "__main__":
    main()
