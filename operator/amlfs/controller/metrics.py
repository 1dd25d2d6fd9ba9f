"""The operator's own Prometheus metrics (served on /metrics by the operator process)."""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from amlfs.spaces import get_space
from amlfs.spec import LossSearchSpec
from amlfs.status import LossSearchStatus

RECONCILE_SECONDS = Histogram(
    "amlfs_operator_reconcile_duration_seconds",
    "Duration of one reconciliation pass.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PASS_WAIT_SECONDS = Histogram(
    "amlfs_operator_pass_wait_seconds",
    "Time a due pass waited for a free worker (AMLFS_WORKERS); high values mean too few workers.",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PASSES = Counter(
    "amlfs_operator_passes",
    "Reconciliation passes by what made them due: first, timer, conflict, resource, pod-started, pod-deleting, "
    "pod-succeeded (one of several), pod-ended, reward.",
    ["cause"],
)
PUSHGATEWAY_READ_SECONDS = Histogram(
    "amlfs_operator_pushgateway_read_seconds",
    "Duration of one read of every pushed result (one for all searches); it grows with the Pushgateway's groups.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
HANDOFF_SECONDS = Histogram(
    "amlfs_operator_epoch_handoff_seconds",
    "Between epochs, while no sample trains. stage=total: from the last result of an epoch pushed to the next "
    "epoch's pods created. The parts: detect (until a pass was due: the reward poll or the pod's exit), due (the "
    "pass starting late), queue (waiting for a worker), read, observe, storage (promotion, history), status "
    "(its write, with the pods being created alongside), pods (what their creation took beyond the write).",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
HANDOFF_STAGES = ("due", "queue", "read", "observe", "storage", "status", "pods")  # those timed by the pass
EPOCHS = Counter("amlfs_operator_epochs_completed", "Search epochs completed.", ["namespace", "search"])
PODS_CREATED = Counter("amlfs_operator_pods_created", "Trainer pods created.", ["namespace", "search"])
PODS_FAILED = Counter(
    "amlfs_operator_pods_failed", "Trainer pods that failed, by kind.", ["namespace", "search", "reason"]
)
BEST_REWARD = Gauge("amlfs_operator_best_reward", "Best reward so far.", ["namespace", "search"])
SEARCH_INFO = Gauge(
    "amlfs_operator_search_info",
    "1 per search; reward_metric names the validation metric its rewards measure (accuracy, mAP, rank1, ...).",
    ["namespace", "search", "reward_metric"],
)
EPOCH = Gauge("amlfs_operator_epoch", "Current epoch (completed epochs).", ["namespace", "search"])
MU = Gauge("amlfs_operator_mu", "Mean of the loss distribution, per parameter.", ["namespace", "search", "parameter"])
SAMPLES = Gauge("amlfs_operator_samples", "Samples of the current epoch by state.", ["namespace", "search", "state"])
PHASE = Gauge("amlfs_operator_phase", "1 for the search's current phase.", ["namespace", "search", "phase"])
CURVE = Gauge(
    "amlfs_operator_loss_curve",
    "The learned t and tau (the loss of mu) at their knots.",
    ["namespace", "search", "function", "knot"],
)
CURVE_X = Gauge(
    "amlfs_operator_loss_curve_x", "Where each knot of t and tau lies.", ["namespace", "search", "function", "knot"]
)
PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
FAILURE_REASONS = ("preempted", "config", "error", "transient", "not-started", "DeadlineExceeded", "Evicted")
STATES = ("Pending", "Running", "Succeeded", "NoReward", "Failed", "ConfigError")


def observe_status(namespace: str, search: str, st: LossSearchStatus, spec: LossSearchSpec) -> None:
    EPOCH.labels(namespace, search).set(st.epoch)
    SEARCH_INFO.labels(namespace, search, spec.reward_metric).set(1)
    if st.best is not None:
        BEST_REWARD.labels(namespace, search).set(st.best.reward)
    from amlfs.core import space_config

    names = get_space(spec.search.space).names(space_config(spec))
    for name, value in zip(names, st.mu, strict=False):
        MU.labels(namespace, search, name).set(value)
    from amlfs.core import program_for
    from amlfs.spaces import evaluate

    program = program_for(spec, st.mu)
    cfg = space_config(spec)
    for fn, lo, hi in (("t", cfg.t_lo, cfg.t_hi), ("tau", 0.0, 1.0)):
        for k in range(cfg.intervals + 1):
            x = lo + (hi - lo) * k / cfg.intervals
            CURVE_X.labels(namespace, search, fn, str(k)).set(x)
            CURVE.labels(namespace, search, fn, str(k)).set(evaluate(program, fn, x))
    for state in STATES:
        SAMPLES.labels(namespace, search, state).set(sum(1 for x in st.samples if x.state == state))
    for phase in PHASES:
        PHASE.labels(namespace, search, phase).set(1 if st.phase == phase else 0)


def forget(namespace: str, search: str, spec: LossSearchSpec) -> None:
    """Drop every series of a deleted search, so dashboards show no stale lines."""
    from amlfs.core import space_config

    cfg = space_config(spec)
    series: list[tuple[Any, tuple[str, ...]]] = [(EPOCH, ()), (BEST_REWARD, ()), (EPOCHS, ()), (PODS_CREATED, ())]
    series += [(MU, (name,)) for name in get_space(spec.search.space).names(cfg)]
    series += [(SAMPLES, (state,)) for state in STATES] + [(PHASE, (phase,)) for phase in PHASES]
    series += [(g, (fn, str(k))) for g in (CURVE, CURVE_X) for fn in ("t", "tau") for k in range(cfg.intervals + 1)]
    series += [(PODS_FAILED, (reason,)) for reason in FAILURE_REASONS] + [(SEARCH_INFO, (spec.reward_metric,))]
    for metric, rest in series:
        with contextlib.suppress(KeyError):
            metric.remove(namespace, search, *rest)
