"""The end-of-run summary: a rich table and a PNG (rewards per epoch, learned t and tau)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from amlfs.core import program_for, space_config
from amlfs.spaces import evaluate, get_space
from amlfs.spec import LossSearchSpec
from amlfs.status import LossSearchStatus


def summary_table(status: LossSearchStatus, history: list[dict[str, Any]], spec: LossSearchSpec) -> Table:
    t = Table(
        title=f"amlfs search: {status.phase} after {status.epoch} epochs (reward: validation {spec.reward_metric})",
        show_lines=False,
    )
    for col in ("epoch", "best sample", "best reward", "mean reward", "rewards", "|Δμ|"):
        t.add_column(col, justify="right" if col != "rewards" else "left")
    for r in history:
        rewards = " ".join("—" if v is None else f"{v:.3f}" for v in r["rewards"])
        t.add_row(
            str(r["epoch"]),
            str(r["best"]),
            f"{r['bestReward']:.4f}",
            f"{r['meanReward']:.4f}",
            rewards,
            f"{r['muStep']:.3f}",
        )
    return t


def mu_table(status: LossSearchStatus, spec: LossSearchSpec) -> Table:
    space, cfg = get_space(spec.search.space), space_config(spec)
    t = Table(title="final μ")
    t.add_column("parameter")
    t.add_column("μ", justify="right")
    t.add_column("identity", justify="right")
    for name, v, i in zip(space.names(cfg), status.mu, space.identity(cfg), strict=True):
        t.add_row(name, f"{v:+.4f}", f"{i:+.1f}")
    return t


def print_summary(
    console: Console, status: LossSearchStatus, history: list[dict[str, Any]], spec: LossSearchSpec
) -> None:
    console.print(summary_table(status, history, spec))
    if spec.search.mode == "search":
        console.print(mu_table(status, spec))
    if status.best is not None:
        console.print(
            f"best reward ({spec.reward_metric}) {status.best.reward:.4f} (epoch {status.best.epoch}, sample "
            f"{status.best.sample}) → {status.best.checkpoint}"
        )


def write_png(path: Path, status: LossSearchStatus, history: list[dict[str, Any]], spec: LossSearchSpec) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for r in history:
        ys = [v for v in r["rewards"] if v is not None]
        ax.scatter([r["epoch"]] * len(ys), ys, s=14, color="tab:blue", alpha=0.5)
    if history:
        ax.plot([r["epoch"] for r in history], [r["bestReward"] for r in history], color="tab:red", label="best")
        ax.plot(
            [r["epoch"] for r in history],
            [r["meanReward"] for r in history],
            color="tab:gray",
            label="mean",
            linestyle="--",
        )
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"reward (validation {spec.reward_metric})")
    ax.set_title("rewards of all samples")
    cfg = space_config(spec)
    final, ident = program_for(spec, status.mu), program_for(spec, get_space(spec.search.space).identity(cfg))
    first = program_for(spec, history[0]["muBefore"]) if history else ident
    for ax, which, lo, hi, label in (
        (axes[1], "t", cfg.t_lo, cfg.t_hi, "target logit / cosine"),
        (axes[2], "tau", 0.0, 1.0, "softmax probability p"),
    ):
        n = 400
        xs = [lo + (hi - lo) * k / (n - 1) for k in range(n)]
        ax.plot(xs, [evaluate(ident, which, x) for x in xs], color="gray", linestyle=":", label="identity (CE)")
        ax.plot(xs, [evaluate(first, which, x) for x in xs], color="tab:orange", linestyle="--", label="initial μ")
        ax.plot(xs, [evaluate(final, which, x) for x in xs], color="tab:green", label="learned μ")
        ax.set_xlabel(label)
        ax.set_title(f"{which}(x)" if which == "t" else "τ(p)")
        ax.legend()
    fig.suptitle(f"{spec.search.space} ({spec.search.parameterization}, M={cfg.intervals}), mode {spec.search.mode}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
