"""Does the loss search help, and do the defaults stay stable? mnist1d, several seeds, four arms:

  ce              plain cross-entropy, one trajectory (no selection)
  selection-only  B samples per epoch, all with cross-entropy, best-of-B kept (the baseline every claim uses)
  paper           AM-LFS as in the paper: per-piece (a, b) for t and tau, sigma 0.2 everywhere, Adam lr 0.05 on mu,
                  no trust region
  default         amlfs defaults (see the spec: today bounded, common random numbers, antithetic pairs, elitism,
                  sigma 0.2, Adam lr 0.05, muBound 1); the first table of docs/results.md was measured with the
                  earlier monotone default

Prints per-seed and mean test accuracy of the final model (the last epoch's best sample) and the ratio of each
arm to selection-only. Runs every sample inline through the trainer CLI (no per-process start-up), CPU or GPU.

  python benchmarks/stability.py --epochs 30 --seeds 3 --samples 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from amlfs import storage
from amlfs.runner import LocalRunner
from amlfs.spec import parse_manifest
from amlfs_trainer.cli import main as trainer_main

ARMS = {
    "selection-only": {"mode": "selection-only"},
    "paper": {"mode": "search", "parameterization": "paper", "muBound": 0},
    "default": {"mode": "search"},
}


def manifest(name: str, epochs: int, samples: int, seed: int, search: dict, dataset: str, model: str) -> dict:
    return {
        "apiVersion": "amlfs.io/v1alpha1",
        "kind": "LossSearch",
        "metadata": {"name": name},
        "spec": {
            "task": {"dataset": dataset, "batchSize": 128},
            "model": {"name": model, "width": 32},
            "optimizer": {"name": "sgd", "lr": 0.05, "weightDecay": 5e-4, "schedule": "cosine"},
            "search": {"epochs": epochs, "samplesPerEpoch": samples, "seed": seed, **search},
        },
    }


def final_test_accuracy(root: str) -> float:
    return storage.read_json(f"{root}/final/result.json")["testAccuracy"]


def run_ce(work: Path, m: dict, device: str) -> float:
    """Plain CE: the trainer CLI chained epoch by epoch from its own checkpoint, sample 0 only."""
    work.mkdir(parents=True, exist_ok=True)
    spec_file = work / "ce-spec.json"
    spec_file.write_text(json.dumps(m["spec"]))
    start, sha, result = "", "", {}
    for e in range(m["spec"]["search"]["epochs"]):
        out = f"file://{work}/ce/epoch-{e:04d}"
        argv = [
            "--spec",
            f"@{spec_file}",
            "--search",
            "ce",
            "--epoch",
            str(e),
            "--sample",
            "0",
            "--output",
            out,
            "--device",
            device,
            "--cache-dir",
            str(work / ".cache"),
        ]
        if start:
            argv += ["--start", start, "--start-sha256", sha]
        if trainer_main(argv) != 0:
            raise SystemExit(f"CE baseline failed at epoch {e}")
        result = storage.read_json(f"{out}/result.json")
        start, sha = result["checkpoint"], result["sha256"]
    return result["testAccuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dataset", default="mnist1d")
    ap.add_argument("--model", default="cnn1d")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arms", default="ce,selection-only,paper,default")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    arms = args.arms.split(",")
    results: dict[str, list[float]] = {a: [] for a in arms}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="amlfs-stability-") as tmp:
        work = Path(tmp)
        for seed in range(args.seeds):
            for arm in arms:
                name = f"{arm}-s{seed}"
                m = manifest(name, args.epochs, args.samples, seed, ARMS.get(arm, {}), args.dataset, args.model)
                if arm == "ce":
                    acc = run_ce(work / name, m, args.device)
                else:
                    runner = LocalRunner(
                        parse_manifest(m), work, device=args.device, inline=True, cache_dir=work / ".cache"
                    )
                    status = runner.run()
                    acc = final_test_accuracy(runner.root) if status.phase == "Succeeded" else float("nan")
                results[arm].append(acc)
                print(f"seed {seed} {arm:15s} test accuracy {acc:.4f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    base = statistics.mean(results["selection-only"]) if "selection-only" in results else None
    print(f"\n{args.dataset}/{args.model}, {args.epochs} epochs, B={args.samples}, {args.seeds} seeds")
    print(f"{'arm':15s} {'mean':>7s} {'std':>7s} {'vs selection-only':>18s}  per seed")
    for arm, accs in results.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ratio = f"{mean / base:.3f}x ({(mean - base) * 100:+.1f} pt)" if base else "-"
        print(f"{arm:15s} {mean:7.4f} {std:7.4f} {ratio:>18s}  {' '.join(f'{a:.4f}' for a in accs)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
