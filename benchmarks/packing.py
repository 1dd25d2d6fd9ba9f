"""Seconds per search epoch: one trainer process per sample versus packs of samples in one process.

For each workload and device it trains one search epoch of B samples (epoch 1, from an epoch-0 checkpoint, so
every process also fetches and loads a start checkpoint, as in a real search) in three ways, each a real
`amlfs-trainer` subprocess, one after another on the same machine:

  (a) one process per sample (what `amlfs run` and the operator do today): B processes;
  (b) one process for all B samples, trained one after another (--pack-mode sequential);
  (c) vectorised packs (--pack-mode vectorized): ceil(B/k) processes of k members, for each k in --pack-sizes.

It prints wall seconds per epoch, samples/s, the ratio to (a), the CPU seconds of the processes (less sensitive
than wall time to other load on a shared machine), the start-up overhead (wall time not spent training,
evaluating or saving) and the mean training time per sample; on CUDA the seconds per epoch are also its
GPU-seconds (every process holds its GPU from start to exit, as a pod does).

Workloads: digits with small-cnn (the bundled quick example's settings), and ResNet-20 on CIFAR-size synthetic
data (32x32x3, 10 classes, written in the CIFAR-10 python format; --cifar-train images, 50000 on CUDA).

    python benchmarks/packing.py                         # CPU (B=4, short), and CUDA (B=8) when present
    python benchmarks/packing.py --devices cuda --samples 8 --pack-sizes 8,4

`--runner` times whole local searches instead: `amlfs run examples/digits-quick.yaml` (6 epochs, B=4, 2 at a
time) with one fresh trainer process per sample (`--fresh-processes`) against the worker pool (the default), and
the pool with packs (`--pack k`, k from --pack-sizes, default 2), one after another. It prints wall seconds, the
ratio, CPU seconds, and per trainer invocation from every result.json: the start-up (waiting for and starting a
trainer, imports, start checkpoint, data, model: `startup + import + setup`), the busy time (training,
evaluation, saving) and the start-up's share, over all invocations and over those that were not the first in
their process; and checks that every variant found the same θ, rewards and checkpoint digests.

    python benchmarks/packing.py --runner
    python benchmarks/packing.py --runner --pack-sizes 2,4 --runner-file examples/digits-quick.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from amlfs import contract, reinforce, storage
from amlfs.spaces import SpaceConfig, get_space
from amlfs.spec import LossSearchSpec, spec_to_json

TRAINER = [sys.executable, "-m", "amlfs_trainer.cli"]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits-quick.yaml"


def digits_spec() -> LossSearchSpec:
    return LossSearchSpec.model_validate(
        {
            "task": {"dataset": "digits", "batchSize": 64, "valFraction": 0.2},
            "model": {"name": "small-cnn", "width": 16},
            "optimizer": {"lr": 0.05, "weightDecay": 0.0005},
            "search": {"epochs": 6, "samplesPerEpoch": 4, "intervals": 6},
        }
    )


def cifar_spec(root: Path) -> LossSearchSpec:
    return LossSearchSpec.model_validate(
        {
            "task": {"dataset": "cifar10", "dataRoot": str(root), "batchSize": 128, "valFraction": 0.1},
            "model": {"name": "resnet20"},
            "optimizer": {"lr": 0.1, "weightDecay": 0.0001},
            "search": {"epochs": 200, "samplesPerEpoch": 4, "intervals": 6},
        }
    )


def write_synthetic_cifar(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """CIFAR-10-shaped data in the CIFAR-10 python format (five data batches and a test batch): each class a
    noisy colour blob, so the networks have something to learn."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    centres = rng.integers(40, 216, size=(10, 3, 1, 1))

    def batch(n: int) -> dict[str, Any]:
        labels = rng.integers(0, 10, size=n)
        images = centres[labels] + rng.normal(0, 48, size=(n, 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {"data": data, "labels": labels.tolist()}

    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for i, n in enumerate(sizes, start=1):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n), f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)


@dataclass
class Run:
    variant: str
    processes: int
    wall: float  # seconds, all processes one after another
    cpu: float  # CPU seconds (user + system) of those processes
    results: list[dict[str, Any]]

    @property
    def busy(self) -> float:
        """Seconds spent training, evaluating and saving (a vectorised pack's train/eval counted once)."""
        total = 0.0
        seen_packs: set[tuple[int, ...]] = set()
        for r in self.results:
            t, p = r.get("timings", {}), r.get("pack", {})
            shared = "train" in p.get("shared", [])
            key = tuple(p.get("samples", [r["sample"]]))
            if not shared or key not in seen_packs:
                total += t.get("train", 0.0) + t.get("eval", 0.0)
                seen_packs.add(key)
            total += t.get("save", 0.0)
        return total


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_trainer(inv: contract.Invocation, log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one trainer process."""
    t, c = time.perf_counter(), _children_cpu()
    with open(log, "ab") as f:
        p = subprocess.run([*TRAINER, *contract.to_argv(inv)], stdout=f, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - t, _children_cpu() - c
    if p.returncode != 0:
        sys.exit(f"trainer exited {p.returncode}; see {log}")
    return wall, cpu


def run_all(invocations: list[contract.Invocation], log: Path) -> tuple[float, float]:
    times = [run_trainer(inv, log) for inv in invocations]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def bench_workload(
    name: str, spec: LossSearchSpec, device: str, samples: int, pack_sizes: list[int], work: Path
) -> list[Run]:
    spec = spec.model_copy(update={"search": spec.search.model_copy(update={"samplesPerEpoch": samples})})
    spec_file = work / f"{name}-{device}.json"
    spec_file.write_text(spec_to_json(spec))
    log = work / f"{name}-{device}.log"
    base = f"file://{work}/{name}-{device}"
    common = {"spec": f"@{spec_file}", "search": name, "device": device, "cache_dir": str(work / "cache")}
    # the start: epoch 0 of sample 0 (not timed)
    out0 = f"{base}/epoch-0000/sample-00"
    run_trainer(contract.Invocation(epoch=0, members=(contract.Member(0, (), out0),), **common), log)
    r0 = storage.read_json(f"{out0}/result.json")
    start = {"start": r0["checkpoint"], "start_sha256": r0["sha256"]}
    space, cfg = get_space(spec.search.space), SpaceConfig.from_spec(spec)
    thetas = reinforce.sample_thetas(space.identity(cfg), spec.search.sigma, 0, 1, samples, True)

    def members(tag: str, indices: range | list[int]) -> tuple[contract.Member, ...]:
        return tuple(contract.Member(i, tuple(thetas[i]), f"{base}/{tag}/sample-{i:02d}") for i in indices)

    def read(tag: str) -> list[dict[str, Any]]:
        return [storage.read_json(f"{base}/{tag}/sample-{i:02d}/result.json") for i in range(samples)]

    runs = []
    invs = [contract.Invocation(epoch=1, members=members("a", [i]), **common, **start) for i in range(samples)]
    runs.append(Run("(a) one process per sample", samples, *run_all(invs, log), read("a")))
    inv = contract.Invocation(epoch=1, members=members("b", range(samples)), pack_mode="sequential", **common, **start)
    runs.append(Run("(b) one process, sequential", 1, *run_all([inv], log), read("b")))
    for k in pack_sizes:
        tag = f"c{k}"
        groups = [list(range(i, min(i + k, samples))) for i in range(0, samples, k)]
        invs = [
            contract.Invocation(epoch=1, members=members(tag, g), pack_mode="vectorized", **common, **start)
            for g in groups
        ]
        runs.append(Run(f"(c) vectorised packs of {k}", len(groups), *run_all(invs, log), read(tag)))
    return runs


def report(workload: str, device: str, samples: int, runs: list[Run]) -> None:
    ref, ref_cpu = runs[0].wall, runs[0].cpu
    gpu = device.startswith("cuda")
    head = f"{'variant':<32}{'procs':>6}{'s/epoch':>9}{'samples/s':>11}{'vs (a)':>8}{'CPU s':>8}{'vs (a)':>8}"
    head += f"{'overhead s':>12}{'train s/sample':>16}"
    print(f"\n{workload} on {device}, B={samples}")
    print(head)
    for r in runs:
        trains = [x["timings"]["train"] for x in r.results]
        per_sample = sum(trains) / len(trains)
        if "train" in r.results[0].get("pack", {}).get("shared", []):
            per_sample = sum(trains) / len(trains) / max(1, len(r.results) / r.processes)
        overhead = r.wall - r.busy
        print(
            f"{r.variant:<32}{r.processes:>6}{r.wall:>9.2f}{samples / r.wall:>11.3f}{ref / r.wall:>7.2f}x"
            f"{r.cpu:>8.1f}{ref_cpu / max(r.cpu, 1e-9):>7.2f}x{overhead:>12.2f}{per_sample:>16.3f}"
        )
    for r in runs:
        trains = ", ".join(f"{x['timings']['train']:.2f}" for x in r.results)
        rewards = ", ".join(f"{x['reward']:.4f}" if x.get("reward") is not None else "-" for x in r.results)
        print(f"  {r.variant[:3]} train s per member [{trains}], rewards [{rewards}]")
    if gpu:
        print("GPU·s per epoch:", ", ".join(f"{r.variant[:3]} {r.wall:.1f}" for r in runs))
    phases = ("startup", "import", "checkpoint", "data", "model", "firstStep", "train", "eval")
    first = runs[0].results[0]["timings"]
    print("one process's phases (s):", ", ".join(f"{p} {first[p]:.2f}" for p in phases if p in first))


# --- whole searches: `amlfs run` with fresh processes, workers, packs ---------------------------------------


@dataclass
class Search:
    variant: str
    wall: float
    cpu: float
    results: list[dict[str, Any]]  # every sample's result.json
    history: list[dict[str, Any]]

    def invocations(self) -> list[list[dict[str, Any]]]:
        """The results grouped by trainer invocation (process and its invocation count)."""
        groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for r in self.results:
            p = r.get("process", {})
            groups.setdefault((p.get("pid", id(r)), p.get("invocation", 1)), []).append(r)
        return list(groups.values())


def startup(inv: list[dict[str, Any]]) -> float:
    """An invocation's start-up: waiting for or starting its trainer, imports, start checkpoint, data, model."""
    t = inv[0]["timings"]
    return t.get("startup", 0.0) + t.get("import", 0.0) + t.get("setup", 0.0)


def busy(inv: list[dict[str, Any]]) -> float:
    """An invocation's training, evaluation and saving, summed over its members."""
    return sum(r["timings"].get(k, 0.0) for r in inv for k in ("train", "eval", "save"))


def run_search(variant: str, manifest: Path, flags: list[str], work: Path) -> Search:
    workdir = work / variant.split()[0].strip("()")
    cmd = [sys.executable, "-m", "amlfs.cli", "run", str(manifest), "--workdir", str(workdir), "--quiet"]
    t, c = time.perf_counter(), _children_cpu()
    p = subprocess.run([*cmd, "--no-report", *flags], capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, _children_cpu() - c
    if p.returncode != 0:
        sys.exit(f"amlfs run {' '.join(flags)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    (root,) = [d for d in workdir.iterdir() if (d / "status.json").exists()]
    results = [json.loads(f.read_text()) for f in sorted(root.glob("epoch-*/sample-*/result.json"))]
    history = [json.loads(line) for line in (root / "history.jsonl").read_text().splitlines() if line.strip()]
    return Search(variant, wall, cpu, results, history)


def bench_runner(manifest: Path, pack_sizes: list[int], work: Path) -> None:
    variants = [("(a) one process per sample", ["--fresh-processes"]), ("(b) worker pool", [])]
    variants += [(f"(c{k}) workers, packs of {k}", ["--pack", str(k)]) for k in pack_sizes]
    searches = []
    for name, flags in variants:
        load = os.getloadavg()[0]
        s = run_search(name, manifest, flags, work)
        after = os.getloadavg()[0]
        print(f"  {name}: {s.wall:.1f} s (1-min load average {load:.1f} before, {after:.1f} after)", flush=True)
        searches.append(s)
    ref = searches[0]
    print(f"\namlfs run {manifest.name}: {len(ref.results)} samples")
    head = f"{'variant':<30}{'wall s':>8}{'vs (a)':>8}{'CPU s':>8}{'vs (a)':>8}{'invocations':>13}"
    head += f"{'start-up s':>12}{'busy s':>8}{'start-up %':>12}{'warm only':>11}"
    print(head)
    for s in searches:
        invs = s.invocations()
        warm = [i for i in invs if i[0].get("process", {}).get("invocation", 1) > 1]
        up, work_s = sum(map(startup, invs)), sum(map(busy, invs))
        warm_up, warm_work = sum(map(startup, warm)), sum(map(busy, warm))
        share_warm = f"{100 * warm_up / (warm_up + warm_work):.1f}%" if warm else "-"
        print(
            f"{s.variant:<30}{s.wall:>8.1f}{ref.wall / s.wall:>7.2f}x{s.cpu:>8.1f}{ref.cpu / max(s.cpu, 1e-9):>7.2f}x"
            f"{len(invs):>8} ({len(invs) - len(warm)} 1st){up / len(invs):>9.2f}{work_s / len(invs):>8.2f}"
            f"{100 * up / (up + work_s):>11.1f}%{share_warm:>11}"
        )
    print(
        "per invocation: start-up = startup + import + setup timings, busy = train + eval + save of its members;\n"
        "start-up % = start-up / (start-up + busy) over all invocations, and over those that were not the first\n"
        "in their process (a worker's first pays the interpreter, torch, the dataset and the first model)"
    )
    same = all(
        [(h["thetas"], h["rewards"], h["sha256"]) for h in s.history]
        == [(h["thetas"], h["rewards"], h["sha256"]) for h in ref.history]
        for s in searches
    )
    print("same θ, rewards and checkpoint sha256 in every variant:", "yes" if same else "NO")
    if not same:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="", help="comma-separated (default: cpu, and cuda when present)")
    parser.add_argument("--samples", type=int, default=0, help="B per epoch (default: 4 on CPU, 8 on CUDA)")
    parser.add_argument("--pack-sizes", default="", help="vectorised pack sizes k (default: B)")
    parser.add_argument("--workloads", default="digits,cifar-resnet20")
    parser.add_argument("--cifar-train", type=int, default=0, help="synthetic CIFAR training images (CPU 384)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--runner", action="store_true", help="time whole `amlfs run` searches instead")
    parser.add_argument("--runner-file", default=str(EXAMPLE), help="the manifest for --runner")
    args = parser.parse_args(argv)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    work = Path(tempfile.mkdtemp(prefix="amlfs-packing-"))
    cpu_threads = torch.get_num_threads()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"torch {torch.__version__}; CPU threads {cpu_threads}; load average {load}", end="")
    if torch.cuda.is_available():
        print(f"; {torch.cuda.get_device_name()}", end="")
    print(f"; work dir {work}", flush=True)
    t_all = time.perf_counter()
    if args.runner:
        try:
            sizes = [int(k) for k in args.pack_sizes.split(",")] if args.pack_sizes else [2]
            bench_runner(Path(args.runner_file), sizes, work)
            print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        return
    try:
        for device in devices:
            gpu = device.startswith("cuda")
            samples = args.samples or (8 if gpu else 4)
            sizes = [int(k) for k in args.pack_sizes.split(",")] if args.pack_sizes else [samples]
            for w in args.workloads.split(","):
                if w == "digits":
                    spec = digits_spec()
                    label = "digits small-cnn"
                elif w == "cifar-resnet20":
                    n_train = args.cifar_train or (50000 if gpu else 384)
                    root = work / f"cifar-{n_train}"
                    if not root.exists():
                        write_synthetic_cifar(root, n_train, max(256, n_train // 5))
                    spec = cifar_spec(root)
                    label = f"ResNet-20 synthetic CIFAR ({n_train} images)"
                else:
                    sys.exit(f"unknown workload {w!r}; use digits or cifar-resnet20")
                t = time.perf_counter()
                runs = bench_workload(w, spec, device, samples, sizes, work)
                report(label, device, samples, runs)
                print(f"(measured in {time.perf_counter() - t:.0f} s)")
        print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
