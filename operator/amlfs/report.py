"""The summary of a search: a rich table and a PNG (rewards per epoch, learned t and tau), at the end of
`amlfs run` and from a storage root alone (`amlfs report`, which also has a JSON form). Without the spec (a root
written before the core stored it) the μ table and the loss curves are left out."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from amlfs import storage
from amlfs.core import program_for, space_config
from amlfs.spaces import evaluate, get_space
from amlfs.spec import LossSearchSpec
from amlfs.status import LossSearchStatus
from amlfs.stored import Stored


def summary_table(status: LossSearchStatus, history: list[dict[str, Any]]) -> Table:
    t = Table(
        title=f"amlfs search: {status.phase} after {status.epoch} epochs (reward: validation "
        f"{status.reward_metric or '?'})",
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
    console: Console, status: LossSearchStatus, history: list[dict[str, Any]], spec: LossSearchSpec | None
) -> None:
    console.print(summary_table(status, history))
    if spec is not None and spec.search.mode == "search":
        console.print(mu_table(status, spec))
    if status.best is not None:
        console.print(
            f"best reward ({status.reward_metric}) {status.best.reward:.4f} (epoch {status.best.epoch}, sample "
            f"{status.best.sample}) → {status.best.checkpoint}"
        )


def write_png(path: Path, status: LossSearchStatus, history: list[dict[str, Any]], spec: LossSearchSpec | None) -> Path:
    """The rewards of all samples per epoch and, given the spec, the initial and learned t and τ; written
    atomically (a temporary file renamed into place), so a failed or watched write never leaves half a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if spec is not None else 1, figsize=(15, 4.2) if spec is not None else (6, 4.2))
    _rewards_panel(axes[0] if spec is not None else axes, status, history)
    if spec is not None:
        _loss_panels(fig, axes[1:], status, history, spec)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(str(path.absolute()), buf.getvalue())
    return path


def _rewards_panel(ax: Any, status: LossSearchStatus, history: list[dict[str, Any]]) -> None:
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
    ax.set_ylabel(f"reward (validation {status.reward_metric or '?'})")
    ax.set_title("rewards of all samples")


def _loss_panels(
    fig: Any, axes: Any, status: LossSearchStatus, history: list[dict[str, Any]], spec: LossSearchSpec
) -> None:
    cfg = space_config(spec)
    final, ident = program_for(spec, status.mu), program_for(spec, get_space(spec.search.space).identity(cfg))
    first = program_for(spec, history[0]["muBefore"]) if history else ident
    for ax, which, lo, hi, label in (
        (axes[0], "t", cfg.t_lo, cfg.t_hi, "target logit / cosine"),
        (axes[1], "tau", 0.0, 1.0, "softmax probability p"),
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


# --- `amlfs report`: a search from its storage root ---------------------------------------------------


def notes(found: Stored) -> list[str]:
    """What a reader of the summary should know beyond the table: an unfinished epoch, a phase the records cannot
    tell, what is left out without the spec."""
    st, spec, out = found.status, found.spec, []
    if st.phase == "Running":
        of = f" of {spec.search.samples_per_epoch}" if spec is not None else ""
        out.append(f"epoch {st.epoch} in progress, samples done: {found.results}{of}")
        if found.phase_from == "records":
            out.append("no final/mu.json yet: the search is running, or suspended or failed (its status says which)")
    elif st.phase != "Succeeded" and st.message:
        out.append(f"{st.phase}: {st.message}")
    if spec is None:
        out.append(f"μ table and loss curves left out: {found.missing_spec}")
    return out


def print_report(console: Console, found: Stored) -> None:
    print_summary(console, found.status, found.history, found.spec)
    for line in notes(found):
        console.print(line, style="dim", markup=False, highlight=False)


def mu_names(found: Stored) -> list[str] | None:
    if found.spec is not None:
        return get_space(found.spec.search.space).names(space_config(found.spec))
    names = (found.final or {}).get("names")
    return list(names) if isinstance(names, list) and len(names) == len(found.status.mu) else None


def summary_json(found: Stored) -> dict[str, Any]:
    """The report as data (`amlfs report --json`)."""
    st, spec = found.status, found.spec
    best = st.best.model_dump(mode="json", by_alias=True) if st.best is not None else None
    return {
        "root": found.root,
        "phase": st.phase,
        "phaseFrom": found.phase_from,
        "epochs": st.epoch,
        "plannedEpochs": spec.search.epochs if spec is not None else None,
        "resultsThisEpoch": found.results if st.phase == "Running" else None,
        "rewardMetric": st.reward_metric,
        "best": best,
        "mu": st.mu,
        "muNames": mu_names(found),
        "space": spec.search.space if spec is not None else (found.final or {}).get("space"),
        "mode": spec.search.mode if spec is not None else None,
        "history": [
            {k: r.get(k) for k in ("epoch", "best", "bestReward", "meanReward", "muStep")} for r in found.history
        ],
        "notes": notes(found),
    }
