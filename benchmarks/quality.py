"""Does the loss search pay where losses matter? Tasks x arms x seeds, with confidence intervals.

Every run trains from scratch with the inline runner and reports the test accuracy of its final model (the
last epoch's best sample). The summary gives, per task and arm, the mean over seeds with a 95 % t-interval,
and the paired difference (same seed: same initial weights, same corrupted data) against selection-only with
its 95 % t-interval.

Tasks (task.labelNoise / task.imbalance touch train and validation, never test):

  mnist1d         clean MNIST-1D, cnn1d
  digits          clean scikit-learn digits, small-cnn
  mnist1d-sym40   40 % symmetric label noise
  mnist1d-pair40  40 % pair-flip label noise (c -> c+1)
  mnist1d-lt50    long-tailed, imbalance ratio 50 (exponential profile); the test split stays balanced

The recipe: SGD, cosine schedule, peak LR 0.2 for mnist1d (tuned for cross-entropy on clean mnist1d: 0.05
gave 0.836, 0.1 0.904, 0.2 0.941, 0.3 0.942, 3 seeds) and 0.1 for digits; batch 128; B = 4.

Arms:

  ce              cross-entropy, one trajectory (no selection)
  selection-only  B samples per epoch, all cross-entropy, best-of-B kept: the baseline of every claim
  fixed:<preset>  selection-only with a fixed preset loss: fixed:gce (q 0.7), fixed:mae, fixed:sce (0.1, 1.0),
                  fixed:ls (label smoothing 0.1), fixed:poly1 (epsilon 1), fixed:focal (gamma 2), fixed:cb
                  (class-balanced cross-entropy, beta 0.999), fixed:la (logit adjustment a = 1; la0.5, la2,
                  poly1-la: Poly-1 with a = 1)
  fixed-balanced:<preset>  the same, best of B by balanced accuracy
  one:<preset>    one trajectory of a fixed preset (no selection)
  retrain:<arm>   one fresh trajectory trained with the final mu of that search arm (same task and seed) as a
                  fixed loss: does the found loss transfer to a new run? (compare with ce)
  default         the search with the spec's defaults: bounded-la with search.polyTerm 1 (around Poly-1)
  default-balloss the default rewarded by the balanced validation loss (neg-balanced-val-loss)
  bounded         the bounded parameterisation without the logit-adjustment coordinate, with common random
                  numbers and antithetic samples (the default before bounded-la)
  bounded-la      the same with the logit-adjustment coordinate (search.priorAdjustment), around cross-entropy
                  (search.polyTerm 0): the default before polyTerm
  bounded-la-balanced, bounded-la-balloss, bounded-la1-balloss:
                  bounded-la rewarded by balanced accuracy / by the balanced validation loss
                  (neg-balanced-val-loss) / the latter starting from a = 1
  bounded-poly1, bounded-poly1-balloss:
                  bounded-la around Poly-1 through init.preset poly1 (every sampled loss carries its
                  epsilon (1 - p) term: the default's search); the latter rewarded by the balanced validation loss
  monotone        the previous default: monotone parameterisation, independent data orders, no antithetic pairs
  paper           the paper's parameterisation (per-piece a, b; no trust region), as monotone otherwise
  bounded-nocrn, bounded-noanti, bounded-old-estimator, bounded-accloss, bounded-valloss, monotone-crn-anti,
  bounded-balanced, monotone-balanced:
                  one setting changed (see CANDIDATES)
  selection-balanced  selection-only choosing the best of B by balanced accuracy (the baseline of *-balanced)
  selection-balloss   selection-only choosing the best of B by the balanced validation loss

Resumable: every finished run appends one JSON line to --out; runs already there are skipped. The summary
(--summary) is recomputed from all lines of --out that match the requested tasks, arms, seeds and epochs.

  python benchmarks/quality.py --tasks mnist1d-sym40 --arms selection-only,default --seeds 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from amlfs import storage
from amlfs.runner import LocalRunner
from amlfs.spec import parse_manifest
from amlfs_trainer.cli import main as trainer_main

TASKS: dict[str, dict[str, Any]] = {
    "mnist1d": {"task": {"dataset": "mnist1d"}, "model": "cnn1d", "epochs": 30},
    "digits": {"task": {"dataset": "digits"}, "model": "small-cnn", "epochs": 20, "lr": 0.1},
    "mnist1d-sym40": {
        "task": {"dataset": "mnist1d", "labelNoise": {"type": "symmetric", "rate": 0.4}},
        "model": "cnn1d",
        "epochs": 30,
    },
    "mnist1d-pair40": {
        "task": {"dataset": "mnist1d", "labelNoise": {"type": "pairflip", "rate": 0.4}},
        "model": "cnn1d",
        "epochs": 30,
    },
    "mnist1d-lt50": {
        "task": {"dataset": "mnist1d", "imbalance": {"ratio": 50}},
        "model": "cnn1d",
        "epochs": 30,
    },
}

FIXED: dict[str, dict[str, Any]] = {
    "gce": {"preset": "gce", "q": 0.7},
    "mae": {"preset": "mae"},
    "sce": {"preset": "sce", "alpha": 0.1, "beta": 1.0},
    "ls": {"preset": "label-smoothing", "smoothing": 0.1},
    "poly1": {"preset": "poly1", "polyEpsilon": 1.0},
    "focal": {"preset": "focal", "gamma": 2.0},
    "cb": {"preset": "softmax", "classBalance": 0.999},
    "la": {"preset": "softmax", "logitAdjustment": 1.0},
    "la0.5": {"preset": "softmax", "logitAdjustment": 0.5},
    "la2": {"preset": "softmax", "logitAdjustment": 2.0},
    "poly1-la": {"preset": "poly1", "polyEpsilon": 1.0, "logitAdjustment": 1.0},
}

# spec.search overrides of the search arms (besides "default", which overrides nothing)
OLD = {"commonRandomNumbers": False, "antithetic": False}
# the bounded form before the prior coordinate (and before search.polyTerm)
B0 = {"parameterization": "bounded", "priorAdjustment": False, "polyTerm": 0.0}
LA = {"parameterization": "bounded", "priorAdjustment": True, "polyTerm": 0.0}  # the default before polyTerm
CANDIDATES: dict[str, dict[str, Any]] = {
    "monotone": {"parameterization": "monotone", **OLD},  # the default before bounded
    "paper": {"parameterization": "paper", "muBound": 0, **OLD},
    "bounded": {**B0, "commonRandomNumbers": True, "antithetic": True},  # the default before bounded-la
    "bounded-nocrn": {**B0, "commonRandomNumbers": False, "antithetic": True},
    "bounded-noanti": {**B0, "commonRandomNumbers": True, "antithetic": False},
    "bounded-old-estimator": {**B0, **OLD},
    "bounded-accloss": {**B0, "reward": "accuracy+loss"},
    "bounded-valloss": {**B0, "reward": "neg-val-loss"},
    "monotone-crn-anti": {"parameterization": "monotone", "commonRandomNumbers": True, "antithetic": True},
    "bounded-balanced": {**B0, "reward": "balanced-accuracy"},
    "monotone-balanced": {"parameterization": "monotone", "reward": "balanced-accuracy"},
    # the bounded form with the logit-adjustment coordinate (search.priorAdjustment)
    "bounded-la": LA,
    "bounded-la-balanced": {**LA, "reward": "balanced-accuracy"},
    "bounded-la-balloss": {**LA, "reward": "neg-balanced-val-loss"},
    "bounded-la1-balloss": {  # starting from Menon et al.'s a = 1
        **LA,
        "reward": "neg-balanced-val-loss",
        "init": {"preset": "softmax", "logitAdjustment": 1.0},
    },
    # bounded-la around Poly-1 (epsilon 1) instead of cross-entropy: every sample carries its term; the same
    # search as the default (search.polyTerm 1), reached through init.preset poly1
    "bounded-poly1": {"init": {"preset": "poly1", "polyEpsilon": 1.0}},
    "default-balloss": {"reward": "neg-balanced-val-loss"},
    "bounded-poly1-balloss": {"init": {"preset": "poly1", "polyEpsilon": 1.0}, "reward": "neg-balanced-val-loss"},
}


def search_overrides(arm: str) -> dict[str, Any]:
    if arm.startswith("retrain:"):  # the search arm's spec: its parameterisation gives the final mu its meaning
        return search_overrides(arm.split(":", 1)[1])
    if arm.startswith("one:"):  # one trajectory of a fixed preset (no selection)
        return {"mode": "selection-only", "init": FIXED[arm.split(":", 1)[1]]}
    if arm == "selection-only":
        return {"mode": "selection-only"}
    if arm == "selection-balanced":  # best-of-B by balanced accuracy
        return {"mode": "selection-only", "reward": "balanced-accuracy"}
    if arm == "selection-balloss":  # best-of-B by the balanced validation loss
        return {"mode": "selection-only", "reward": "neg-balanced-val-loss"}
    if arm.startswith("fixed:"):
        return {"mode": "selection-only", "init": FIXED[arm.split(":", 1)[1]]}
    if arm.startswith("fixed-balanced:"):  # best-of-B by balanced accuracy
        return {"mode": "selection-only", "init": FIXED[arm.split(":", 1)[1]], "reward": "balanced-accuracy"}
    if arm == "default":
        return {}
    if arm in CANDIDATES:
        return CANDIDATES[arm]
    raise SystemExit(
        f"unknown arm {arm!r}: use ce, selection-only, default, fixed:<{'|'.join(FIXED)}> or one of "
        f"{', '.join(CANDIDATES)}"
    )


def manifest(task: str, arm: str, seed: int, epochs: int, samples: int) -> dict[str, Any]:
    t = TASKS[task]
    task_spec = json.loads(json.dumps(t["task"])) | {"batchSize": 128}
    for key in ("labelNoise", "imbalance"):  # the corruption follows the seed: paired across arms
        if key in task_spec:
            task_spec[key]["seed"] = seed
    search = {"epochs": epochs, "samplesPerEpoch": samples, "seed": seed}
    search |= search_overrides("selection-only" if arm == "ce" else arm)
    return {
        "apiVersion": "amlfs.io/v1alpha1",
        "kind": "LossSearch",
        "metadata": {"name": "q"},
        "spec": {
            "task": task_spec,
            "model": {"name": t["model"], "width": 32},
            "optimizer": {"name": "sgd", "lr": t.get("lr", 0.2), "weightDecay": 5e-4, "schedule": "cosine"},
            "search": search,
        },
    }


def run_single(
    work: Path, m: dict[str, Any], device: str, threads: int = 0, theta: list[float] | None = None
) -> dict[str, Any]:
    """One trajectory of the init loss (or of theta's loss): the trainer CLI chained epoch by epoch, sample 0."""
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(m["spec"]))
    start, sha, result, curve = "", "", {}, []
    for e in range(m["spec"]["search"]["epochs"]):
        out = f"file://{work}/single/epoch-{e:04d}"
        argv = ["--spec", f"@{spec_file}", "--search", "single", "--epoch", str(e), "--sample", "0"]
        if theta is not None:
            argv += ["--theta", json.dumps(theta)]
        argv += ["--output", out, "--device", device, "--cache-dir", str(CACHE), "--threads", str(threads)]
        if start:
            argv += ["--start", start, "--start-sha256", sha]
        with contextlib.redirect_stdout(io.StringIO()):
            rc = trainer_main(argv)
        if rc != 0:
            return {"status": "failed", "testAccuracy": math.nan}
        result = storage.read_json(f"{out}/result.json")
        if result.get("status") != "ok":
            return {"status": "diverged", "testAccuracy": math.nan}
        start, sha = result["checkpoint"], result["sha256"]
        curve.append(round(result["testAccuracy"], 4))
    return {"status": "ok", "testAccuracy": result["testAccuracy"], "valReward": result["reward"], "curve": curve}


def run_search(work: Path, m: dict[str, Any], device: str, threads: int = 0) -> dict[str, Any]:
    runner = LocalRunner(parse_manifest(m), work, device=device, inline=True, cache_dir=CACHE, threads=threads)
    status = runner.run()
    if status.phase != "Succeeded":
        return {"status": status.phase, "testAccuracy": math.nan, "message": status.message}
    final = storage.read_json(f"{runner.root}/final/result.json")
    curve, mu_curve = [], []
    for h in (json.loads(x) for x in storage.read_bytes(f"{runner.root}/history.jsonl").decode().splitlines()):
        r = storage.read_json(f"{runner.root}/epoch-{h['epoch']:04d}/sample-{h['best']:02d}/result.json")
        curve.append(round(r["testAccuracy"], 4))
        # small spaces whole; the bounded one's floor (and logit-adjustment) coordinates
        tail = h["muAfter"] if len(h["muAfter"]) <= 4 else h["muAfter"][m["spec"]["search"].get("intervals", 6) + 1 :]
        mu_curve.append([round(v, 3) for v in tail])
    return {
        "status": "ok",
        "testAccuracy": final["testAccuracy"],
        "valReward": final["reward"],
        "curve": curve,
        "mu": [round(v, 4) for v in status.mu],
        "muCurve": mu_curve,
    }


CACHE = Path(tempfile.gettempdir()) / "amlfs-quality-cache"


def key(rec: dict[str, Any]) -> tuple[Any, ...]:
    return rec["task"], rec["arm"], rec["seed"], rec["epochs"], rec["samples"], rec.get("lr")


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: that run is simply redone
                continue
    return out


def t_interval(xs: list[float]) -> tuple[float, float]:
    """Half-width of the 95 % t-interval of the mean, and the mean."""
    from scipy.stats import t

    n = len(xs)
    mean = statistics.fmean(xs)
    if n < 2:
        return mean, math.nan
    return mean, t.ppf(0.975, n - 1) * statistics.stdev(xs) / math.sqrt(n)


def summarize(records: list[dict[str, Any]], tasks: list[str], arms: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in tasks:
        rows: dict[str, Any] = {}
        by_arm = {
            a: {r["seed"]: r["testAccuracy"] for r in records if r["task"] == task and r["arm"] == a} for a in arms
        }
        base = by_arm.get("selection-only", {})
        for arm in arms:
            accs = by_arm[arm]
            if not accs:
                continue
            vals = [accs[s] for s in sorted(accs)]
            mean, half = t_interval(vals)
            row = {"n": len(vals), "mean": mean, "ci95": half, "min": min(vals), "seeds": sorted(accs), "perSeed": vals}
            common = sorted(set(accs) & set(base))
            if arm != "selection-only" and len(common) >= 2:
                d = [accs[s] - base[s] for s in common]
                dm, dh = t_interval(d)
                row |= {"diffVsSelection": dm, "diffCi95": dh, "diffN": len(d)}
            rows[arm] = row
        fixed = {a: r["mean"] for a, r in rows.items() if a.startswith(("fixed:", "fixed-balanced:"))}
        if fixed and "selection-only" in rows:
            best = max(fixed, key=lambda a: fixed[a])
            gap = fixed[best] - rows["selection-only"]["mean"]
            for arm, r in rows.items():
                if not arm.startswith(("fixed", "ce", "selection-only")) and gap > 0 and "diffVsSelection" in r:
                    r |= {"bestFixed": best, "gapClosed": r["diffVsSelection"] / gap}
        out[task] = rows
    return out


def print_summary(summary: dict[str, Any], epochs: dict[str, int], samples: int) -> None:
    for task, rows in summary.items():
        print(f"\n{task} ({epochs[task]} epochs, B={samples}): test accuracy, mean ± 95 % CI; paired vs selection-only")
        print(f"  {'arm':18s} {'n':>2s} {'mean':>7s} {'±CI':>6s} {'min':>6s} {'Δ vs sel':>9s} {'±CI':>6s}")
        for arm, r in rows.items():
            diff = (
                f"{100 * r['diffVsSelection']:+9.1f} {100 * r['diffCi95']:6.1f}"
                if "diffVsSelection" in r
                else f"{'':9s} {'':6s}"
            )
            print(f"  {arm:18s} {r['n']:2d} {100 * r['mean']:7.1f} {100 * r['ci95']:6.1f} {100 * r['min']:6.1f} {diff}")


def markdown(summary: dict[str, Any], epochs: dict[str, int]) -> str:
    """The summary as one Markdown table per task (percentage points)."""
    out = []
    for task, rows in summary.items():
        out.append(f"\n**{task}** ({epochs[task]} epochs)\n")
        out.append("| arm | n | mean ± 95 % CI | min | Δ vs selection-only ± 95 % CI | gap to best preset closed |")
        out.append("|---|---|---|---|---|---|")
        for arm, r in rows.items():
            diff = f"{100 * r['diffVsSelection']:+.1f} ± {100 * r['diffCi95']:.1f}" if "diffVsSelection" in r else "—"
            gap = f"{100 * r['gapClosed']:.0f} % of {r['bestFixed']}" if "gapClosed" in r else ""
            out.append(
                f"| {arm} | {r['n']} | {100 * r['mean']:.1f} ± {100 * r['ci95']:.1f} | {100 * r['min']:.1f} | {diff} "
                f"| {gap} |"
            )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--arms", default="ce,selection-only,default,paper")
    ap.add_argument("--seeds", default="5", help="N (seeds 0..N-1) or a comma list, e.g. 5,6,7")
    ap.add_argument("--epochs", type=int, default=0, help="override every task's epochs (0: the task's own)")
    ap.add_argument("--samples", type=int, default=4, help="B")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads of every run (0: the CPU quota; 1 to run several at once)"
    )
    ap.add_argument("--out", default="docs/quality.jsonl", help="one JSON line per finished run (resumable)")
    ap.add_argument("--summary", default="", help="also write the summary as JSON here")
    ap.add_argument("--summary-only", action="store_true", help="run nothing; summarize --out")
    ap.add_argument("--markdown", action="store_true", help="also print the summary as Markdown tables")
    args = ap.parse_args()
    tasks, arms = args.tasks.split(","), args.arms.split(",")
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}: use {', '.join(TASKS)}")
    for a in arms:
        if a != "ce":
            search_overrides(a)
    seeds = list(range(int(args.seeds))) if "," not in args.seeds else [int(s) for s in args.seeds.split(",")]
    epochs = {t: args.epochs or TASKS[t]["epochs"] for t in tasks}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {key(r) for r in load(out)}
    t0 = time.perf_counter()
    if not args.summary_only:
        for seed in seeds:
            for task in tasks:
                for arm in arms:
                    rec_key = (task, arm, seed, epochs[task], args.samples, TASKS[task].get("lr", 0.2))
                    if rec_key in done:
                        continue
                    m = manifest(task, arm, seed, epochs[task], args.samples)
                    t1 = time.perf_counter()
                    with tempfile.TemporaryDirectory(prefix="amlfs-quality-") as tmp:
                        work = Path(tmp)
                        if arm.startswith("retrain:"):
                            source = {key(r): r for r in load(out)}.get((task, arm[8:], *rec_key[2:]))
                            if source is None or "mu" not in source:
                                print(f"seed {seed} {task:15s} {arm:18s} skipped: run {arm[8:]} first", flush=True)
                                continue
                            res = run_single(work, m, args.device, args.threads, theta=source["mu"])
                        elif arm == "ce" or arm.startswith("one:"):
                            res = run_single(work, m, args.device, args.threads)
                        else:
                            res = run_search(work, m, args.device, args.threads)
                    rec = {
                        "lr": TASKS[task].get("lr", 0.2),
                        "task": task,
                        "arm": arm,
                        "seed": seed,
                        "epochs": epochs[task],
                        "samples": args.samples,
                        **res,
                        "wallSeconds": round(time.perf_counter() - t1, 1),
                        "search": m["spec"]["search"],
                        "taskSpec": m["spec"]["task"],
                    }
                    with out.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    done.add(rec_key)
                    print(
                        f"seed {seed} {task:15s} {arm:18s} test {res['testAccuracy']:.4f} "
                        f"({rec['wallSeconds']:.0f}s, total {time.perf_counter() - t0:.0f}s)",
                        flush=True,
                    )
    records = [
        r
        for r in load(out)
        if r["task"] in tasks
        and key(r)[-1] == TASKS[r["task"]].get("lr", 0.2)
        and r["arm"] in arms
        and r["seed"] in seeds
        and r["epochs"] == epochs[r["task"]]
        and r["samples"] == args.samples
    ]
    summary = summarize(records, tasks, arms)
    print_summary(summary, epochs, args.samples)
    if args.markdown:
        print(markdown(summary, epochs))
    if args.summary:
        Path(args.summary).write_text(
            json.dumps({"args": vars(args), "epochs": epochs, "summary": summary}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
