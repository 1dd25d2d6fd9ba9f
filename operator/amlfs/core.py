"""The search as a pure state machine: `step(spec, status, observations, root) -> (status, actions)`.

No I/O, no clocks, no torch. The local runner and the Kubernetes operator are thin shells that
1. gather observations of the current epoch's samples (processes/pods and their result.json),
2. call `step`,
3. apply the storage actions (Promote, AppendHistory, WriteJson), which are idempotent, so that a crash
   before the next point simply redoes them,
4. durably save the returned status, and only then
5. start the samples (StartSample), idempotently: starting a sample that already runs is a no-op. So an
   epoch's thetas are always recorded before any trainer for them starts.

Because every sampled theta is a pure function of (seed, epoch, sample, mu) and mu lives in the status, a
controller restarted at any point re-derives exactly the same samples.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

from amlfs import reinforce
from amlfs.contract import CHECKPOINT
from amlfs.spaces import SpaceConfig, get_space, preset_program, with_class_balance
from amlfs.spec import LossSearchSpec
from amlfs.status import (
    HISTORY_LIMIT,
    TERMINAL_SAMPLE_STATES,
    AdamState,
    Best,
    Checkpoint,
    EpochRecord,
    LossSearchStatus,
    SampleStatus,
)

MAX_UNCOUNTED_RESTARTS = 50
BLOWUP = 2.0  # a sample's validation loss above this times the epoch's median: blown up (`_drop_blown_up`)
BLOWUP_NATS = 1.0  # ... and above the median by this much (near-zero losses differ by large ratios harmlessly)

Outcome = Literal["running", "succeeded", "no-reward", "failed", "config-error", "preempted", "absent"]


@dataclass(frozen=True)
class Observation:
    """What a shell saw of one sample of one epoch.

    running: a trainer for it is alive or about to start (the message: why it has not started yet).
    succeeded / no-reward: its result.json exists (no-reward: the loss diverged). failed: it failed (retried up to
    maxRetries). config-error: the trainer's configuration exit code (never retried). preempted: evicted,
    preempted, or failed for a cause of the platform such as a storage outage (restarted, not counted).
    absent: nothing runs and no result exists although the status says it was started (a restarted shell).
    """

    epoch: int
    sample: int
    outcome: Outcome
    attempt: int = 0
    reward: float | None = None
    sha256: str = ""
    message: str = ""
    val_loss: float | None = None  # its validation loss (result.json valLoss), when the task reports one


@dataclass(frozen=True)
class StartSample:
    epoch: int
    sample: int
    attempt: int
    theta: list[float]  # the trainer derives the loss program from it (program_for)
    start: Checkpoint | None
    output: str  # prefix URI: the trainer writes checkpoint.pt and result.json below it
    restarts: int = 0  # uncounted restarts so far (a shell names the new pod/process after it)
    pack: int | None = None  # the epoch's pack it trains in (a pod per pack and attempt); None: alone


@dataclass(frozen=True)
class Promote:
    """Copy a sample's checkpoint.pt and result.json to each target prefix (server-side on S3)."""

    epoch: int
    sample: int
    source: str
    targets: list[str]


@dataclass(frozen=True)
class AppendHistory:
    uri: str
    record: dict[str, Any]


@dataclass(frozen=True)
class WriteJson:
    uri: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Finished:
    phase: str
    message: str


Action = StartSample | Promote | AppendHistory | WriteJson | Finished


@dataclass
class Layout:
    """Where a search's objects live below its storage root."""

    root: str

    def epoch_dir(self, epoch: int) -> str:
        return f"{self.root.rstrip('/')}/epoch-{epoch:04d}"

    def sample_dir(self, epoch: int, sample: int) -> str:
        return f"{self.epoch_dir(epoch)}/sample-{sample:02d}"

    def epoch_best(self, epoch: int) -> str:
        return f"{self.epoch_dir(epoch)}/best"

    @property
    def best(self) -> str:
        return f"{self.root.rstrip('/')}/best"

    @property
    def final(self) -> str:
        return f"{self.root.rstrip('/')}/final"

    @property
    def history(self) -> str:
        return f"{self.root.rstrip('/')}/history.jsonl"

    @property
    def spec(self) -> str:
        return f"{self.root.rstrip('/')}/spec.json"


@dataclass
class _Step:
    spec: LossSearchSpec
    st: LossSearchStatus
    layout: Layout
    actions: list[Action] = field(default_factory=list)


def space_config(spec: LossSearchSpec) -> SpaceConfig:
    return SpaceConfig.from_spec(spec)


def spec_as_begun(spec: LossSearchSpec, status: LossSearchStatus | None) -> LossSearchSpec:
    """The spec a search with this status runs under. An upgraded CRD fills in fields a running search predates
    with their defaults; the search keeps what it began with. search.polyTerm is recorded in the status (a
    status without it: begun before the term, 0). A search begun before search.priorAdjustment has a mu one
    coordinate shorter."""
    if status is None or not status.mu:
        return spec
    begun: dict[str, Any] = {}
    poly = status.poly_term if status.poly_term is not None else 0.0
    if spec.search.poly_term != poly:
        begun["poly_term"] = poly
    if spec.search.prior_adjustment:  # mu's length tells (the term does not change it)
        space = get_space(spec.search.space)
        without = spec.model_copy(update={"search": spec.search.model_copy(update={"prior_adjustment": False})})
        if len(status.mu) != space.dim(space_config(spec)) and len(status.mu) == space.dim(space_config(without)):
            begun["prior_adjustment"] = False
    return spec.model_copy(update={"search": spec.search.model_copy(update=begun)}) if begun else spec


def initial_mu(spec: LossSearchSpec) -> list[float]:
    space, cfg = get_space(spec.search.space), space_config(spec)
    if spec.search.init.preset == "softmax" and (spec.search.init.logit_adjustment == 0 or not cfg.prior_adjustment):
        return space.identity(cfg)
    try:
        return space.from_preset(spec.search.init, cfg)
    except ValueError:
        if spec.search.mode == "selection-only":  # mu is only reported there; the samples train the exact preset
            return space.identity(cfg)
        raise


def program_for(spec: LossSearchSpec, theta: list[float]) -> dict[str, Any]:
    if spec.search.mode == "selection-only":
        return preset_program(spec.search.init, spec.optimizer.label_smoothing)
    return with_class_balance(get_space(spec.search.space).program(theta, space_config(spec)), spec.search.init)


def initial_status(spec: LossSearchSpec) -> LossSearchStatus:
    mu = initial_mu(spec)
    return LossSearchStatus(
        phase="Pending",
        epoch=0,
        mu=mu,
        sigma=spec.search.sigma,
        poly_term=spec.search.poly_term,
        reward_metric=spec.reward_metric,
        adam=AdamState(step=0, m=[0.0] * len(mu), v=[0.0] * len(mu)),
    )


def step(
    spec: LossSearchSpec, status: LossSearchStatus | None, observations: list[Observation], root: str
) -> tuple[LossSearchStatus, list[Action]]:
    """Decide the next status and actions. Pure: same inputs, same outputs."""
    st = initial_status(spec) if status is None or not status.mu else status.model_copy(deep=True)
    st.reward_metric = spec.reward_metric  # statuses written before the field existed lack it
    s = _Step(spec, st, Layout(root))
    if st.phase == "Failed" and not _reopen(s):
        return st, []
    if st.phase == "Succeeded":
        if spec.search.epochs <= st.epoch:
            return st, []
        st.phase = "Running"  # epochs were raised on a finished search: continue it
        st.message = ""
    if not st.samples:
        if st.epoch >= spec.search.epochs:
            return _finish(s)
        if spec.suspend:
            st.phase = "Suspended"
            st.message = f"suspended before epoch {st.epoch}"
            return st, []
        _plan_epoch(s)
    else:
        _observe(s, observations)
        if all(x.state in TERMINAL_SAMPLE_STATES for x in st.samples):
            _close_epoch(s)
            if st.phase == "Failed":
                return st, s.actions
            if st.epoch >= spec.search.epochs:
                st, actions = _finish(s)
                return st, actions
            if spec.suspend:
                st.phase = "Suspended"
                st.message = f"suspended before epoch {st.epoch}"
                return st, s.actions
            _plan_epoch(s)
    st.phase = "Running"
    _start_pending(s)
    return st, s.actions


def _reopen(s: _Step) -> bool:
    """A search that failed for too few rewards resumes when spec.search.maxRetries was raised above the attempts
    of its failed samples: those are retried, the rest of the epoch is kept."""
    st, max_retries = s.st, s.spec.search.max_retries
    if st.reason != "TooFewRewards":
        return False
    again = [
        x
        for x in st.samples
        if x.state == "Failed" and x.attempt < max_retries and x.restarts <= MAX_UNCOUNTED_RESTARTS
    ]
    for x in again:
        x.attempt += 1
        x.state, x.message = "Pending", f"retry {x.attempt} after maxRetries was raised to {max_retries}"
    if again:
        st.phase, st.reason, st.message = "Running", "", ""
    return bool(again)


def _plan_epoch(s: _Step) -> None:
    st, sp = s.st, s.spec.search
    st.sigma = sp.sigma  # a changed sigma applies from here; the epoch's update uses the sigma it sampled with
    if sp.mode == "selection-only":
        thetas = [list(st.mu) for _ in range(sp.samples_per_epoch)]
    else:
        thetas = reinforce.sample_thetas(
            st.mu, st.sigma, sp.seed, st.epoch, sp.samples_per_epoch, sp.elitism, sp.antithetic
        )
    k = s.spec.trainer.samples_per_pod  # fixed for the epoch here, so a changed spec waits for the next one
    st.samples = [SampleStatus(index=i, theta=t, pack=i // k if k > 1 else None) for i, t in enumerate(thetas)]
    st.message = ""
    if st.reason == "ConfigError":  # a sample of an earlier epoch: this epoch is not degraded by it
        st.reason = ""


def _start_pending(s: _Step) -> None:
    for x in s.st.samples:
        if x.state == "Pending":
            s.actions.append(
                StartSample(
                    epoch=s.st.epoch,
                    sample=x.index,
                    attempt=x.attempt,
                    theta=list(x.theta),
                    start=s.st.start,
                    output=s.layout.sample_dir(s.st.epoch, x.index),
                    restarts=x.restarts,
                    pack=x.pack,
                )
            )


def _observe(s: _Step, observations: list[Observation]) -> None:
    st, max_retries = s.st, s.spec.search.max_retries
    by_index = {x.index: x for x in st.samples}
    for o in observations:
        x = by_index.get(o.sample)
        if o.epoch != st.epoch or x is None or x.state in TERMINAL_SAMPLE_STATES or o.attempt < x.attempt:
            continue
        out = s.layout.sample_dir(st.epoch, x.index)
        if o.outcome == "running":
            x.state, x.message = "Running", o.message  # a message: why its trainer has not started yet
        elif o.outcome == "succeeded":
            if o.reward is None or not math.isfinite(o.reward):
                x.state, x.message = "NoReward", o.message or "result has no finite reward"
            else:
                x.state, x.reward, x.sha256 = "Succeeded", float(o.reward), o.sha256
                x.checkpoint, x.message = f"{out}/{CHECKPOINT}", ""
                x.val_loss = o.val_loss if o.val_loss is not None and math.isfinite(o.val_loss) else None
        elif o.outcome == "no-reward":
            x.state, x.message = "NoReward", o.message or "the loss or gradient became non-finite"
        elif o.outcome == "config-error":
            x.state, x.message = "ConfigError", o.message or "invalid configuration"
            st.reason, st.message = "ConfigError", f"sample {x.index}: {x.message}"
        elif o.outcome == "failed":
            if x.attempt < max_retries:
                x.attempt += 1
                x.state, x.message = "Pending", f"retry {x.attempt} after: {o.message or 'failure'}"
            else:
                x.state = "Failed"
                x.message = f"failed {x.attempt + 1} times; last: {o.message or 'failure'}"
        elif o.outcome in ("preempted", "absent") and (o.outcome == "preempted" or x.state == "Running"):
            x.restarts += 1
            if x.restarts > MAX_UNCOUNTED_RESTARTS:
                x.state, x.message = "Failed", f"restarted {x.restarts} times without finishing"
            else:
                x.state, x.message = "Pending", f"restart after {o.outcome}" + (f": {o.message}" if o.message else "")


def _drop_blown_up(s: _Step) -> None:
    """Samples whose validation loss ended above BLOWUP times the median of the epoch's succeeded samples have blown
    up (their logits exploded: measured, a model chosen for 0.3 % more accuracy with three times its siblings'
    validation loss stalled its search for good). They count as without reward: never promoted, and at the floor
    in the update, so the search learns to avoid them. Fewer than half can be above twice the median; a loss must
    also exceed it by BLOWUP_NATS (on a task fitted to near-zero losses, 0.01 against 0.03 is no blow-up); none
    is dropped where that would leave fewer than minSamples rewards."""
    st = s.st
    losses = {x.index: x.val_loss for x in st.samples if x.state == "Succeeded" and x.val_loss is not None}
    if len(losses) < 3:
        return
    median = statistics.median(losses.values())
    limit = max(BLOWUP * median, median + BLOWUP_NATS)
    blown = [x for x in st.samples if losses.get(x.index, -math.inf) > limit]
    kept = sum(x.state == "Succeeded" for x in st.samples) - len(blown)
    if not blown or kept < s.spec.search.min_samples:
        return
    for x in blown:
        x.message = (
            f"validation loss {losses[x.index]:.4g}, above {limit:.4g} ({BLOWUP:g} times the epoch's median "
            f"{median:.4g}, and {BLOWUP_NATS:g} nat above it): the model blew up; not promoted, rewarded as diverged"
        )
        x.state, x.reward = "NoReward", None


def _close_epoch(s: _Step) -> None:
    _drop_blown_up(s)
    st, spec, lay = s.st, s.spec, s.layout
    rewards = [x.reward if x.state == "Succeeded" else None for x in st.samples]
    got = [i for i, r in enumerate(rewards) if r is not None]
    valid = [r for r in rewards if r is not None]
    if len(got) < spec.search.min_samples:
        failures = "; ".join(f"sample {x.index}: {x.message}" for x in st.samples if x.state != "Succeeded")
        st.phase, st.reason = "Failed", "TooFewRewards"
        st.message = (
            f"epoch {st.epoch}: {len(got)} of {len(st.samples)} samples produced a reward, "
            f"minSamples is {spec.search.min_samples}. {failures}"
        )[:1000]
        s.actions.append(Finished("Failed", st.message))
        return
    best_i = reinforce.best_index(rewards)
    assert best_i is not None
    bx = st.samples[best_i]
    old_mu = list(st.mu)
    update = reinforce.update_rewards(rewards, [x.state == "NoReward" for x in st.samples], spec.search.elitism)
    if spec.search.mode == "search":
        used = [(st.samples[i].theta, r) for i, r in enumerate(update) if r is not None]
        grad = reinforce.reinforce_gradient(st.mu, [t for t, _ in used], [r for _, r in used], st.sigma)
        if grad is not None:
            st.mu, st.adam = reinforce.adam_ascent(st.mu, grad, st.adam, spec.search.lr)
            if spec.search.mu_bound > 0:
                st.mu = reinforce.clip_to(st.mu, initial_mu(spec), spec.search.mu_bound)
    mu_step = math.sqrt(sum((a - b) ** 2 for a, b in zip(st.mu, old_mu, strict=True)))
    best_reward = valid[got.index(best_i)]
    record = EpochRecord(
        epoch=st.epoch,
        rewards=rewards,
        best=best_i,
        best_reward=best_reward,
        mean_reward=sum(valid) / len(valid),
        mu_step=mu_step,
    )
    st.history = [*st.history, record][-HISTORY_LIMIT:]
    full = record.model_dump(mode="json", by_alias=True) | {
        "rewardMetric": spec.reward_metric,
        "thetas": [x.theta for x in st.samples],
        "states": [x.state for x in st.samples],
        "updateRewards": update if spec.search.mode == "search" else [],
        "muBefore": old_mu,
        "muAfter": list(st.mu),
        "sigma": st.sigma,
        "checkpoint": bx.checkpoint,
        "sha256": bx.sha256,
    }
    s.actions.append(AppendHistory(lay.history, full))
    # the spec beside the history, so that a storage root alone is enough to report on the search (amlfs report);
    # written with each closed epoch, the pass that writes storage anyway
    s.actions.append(WriteJson(lay.spec, spec.model_dump(mode="json", by_alias=True)))
    targets = [lay.epoch_best(st.epoch)]
    if st.best is None or best_reward > st.best.reward:
        st.best = Best(
            epoch=st.epoch, sample=best_i, reward=best_reward, checkpoint=f"{lay.best}/{CHECKPOINT}", sha256=bx.sha256
        )
        targets.append(lay.best)
    s.actions.append(Promote(st.epoch, best_i, lay.sample_dir(st.epoch, best_i), targets))
    st.start = Checkpoint(uri=bx.checkpoint, sha256=bx.sha256)
    st.epoch += 1
    st.samples = []


def _finish(s: _Step) -> tuple[LossSearchStatus, list[Action]]:
    st, lay = s.st, s.layout
    st.phase, st.reason = "Succeeded", "Completed"
    st.samples = []
    last = st.history[-1] if st.history else None
    st.message = f"{st.epoch} epochs done" + (f"; best reward {st.best.reward:.4f}" if st.best else "")
    if last is not None:
        s.actions.append(Promote(last.epoch, last.best, lay.sample_dir(last.epoch, last.best), [lay.final]))
    space = get_space(s.spec.search.space)
    cfg = space_config(s.spec)
    s.actions.append(
        WriteJson(
            f"{lay.final}/mu.json",
            {
                "space": space.name,
                "parameterization": cfg.parameterization,
                "intervals": cfg.intervals,
                "names": space.names(cfg),
                "mu": list(st.mu),
                "sigma": st.sigma,
                "program": space.program(list(st.mu), cfg),
                # the loss to train with, as `amlfs export` hands it on: mu's program as the samples trained it
                # (class balance included; selection-only: the preset), with the head it acts on
                "loss": program_for(s.spec, list(st.mu)),
                "head": s.spec.model.head,
                "scale": s.spec.model.scale,
                "epochs": st.epoch,
            },
        )
    )
    s.actions.append(Finished("Succeeded", st.message))
    return st, s.actions
