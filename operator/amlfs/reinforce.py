"""Sampling and the REINFORCE update of the loss distribution N(mu, sigma^2 I). Pure Python, deterministic."""

from __future__ import annotations

import math
import random

from amlfs.status import AdamState


def noise(seed: int, epoch: int, sample: int, dim: int) -> list[float]:
    """Standard normal noise for (seed, epoch, sample): a pure function, so restarts re-derive it exactly."""
    rng = random.Random(f"amlfs:{seed}:{epoch}:{sample}")
    return [rng.gauss(0.0, 1.0) for _ in range(dim)]


def sample_thetas(
    mu: list[float], sigma: float, seed: int, epoch: int, count: int, elitism: bool, antithetic: bool = False
) -> list[list[float]]:
    """theta = mu + sigma eps for every sample (sample 0 is mu itself with elitism). Antithetic: the sampled
    ones come in mirrored pairs mu + sigma eps, mu - sigma eps (an odd one out stays unpaired)."""
    out = []
    first = 1 if elitism else 0
    for i in range(count):
        if i < first:
            out.append(list(mu))
            continue
        mirror = antithetic and (i - first) % 2 == 1
        eps = noise(seed, epoch, i - 1 if mirror else i, len(mu))
        sign = -1.0 if mirror else 1.0
        out.append([m + sign * sigma * e for m, e in zip(mu, eps, strict=True)])
    return out


def normalized(rewards: list[float]) -> list[float] | None:
    """z-scores of the rewards; None when they carry no signal (fewer than 2, or all equal)."""
    n = len(rewards)
    if n < 2:
        return None
    mean = sum(rewards) / n
    var = sum((r - mean) ** 2 for r in rewards) / n
    if var <= 1e-24:
        return None
    sd = math.sqrt(var)
    return [(r - mean) / sd for r in rewards]


LOSS_TIE_BREAK = 0.01
"""Weight of the validation cross-entropy in the accuracy+loss reward."""


def reward_value(
    kind: str, accuracy: float, loss: float, balanced: float = math.nan, balanced_loss: float = math.nan
) -> float:
    """A sample's reward from its validation accuracy, (plain cross-entropy) loss, balanced accuracy (mean
    per-class recall) and balanced loss (the mean over classes of their mean cross-entropy); see
    spec.search.reward."""
    if kind == "accuracy":
        return accuracy
    if kind == "balanced-accuracy":
        return balanced
    if kind == "accuracy+loss":
        return accuracy - LOSS_TIE_BREAK * loss
    if kind == "neg-val-loss":
        return -loss
    if kind == "neg-balanced-val-loss":
        return -balanced_loss
    raise ValueError(
        f"search.reward: unknown reward {kind!r}; use accuracy, balanced-accuracy, accuracy+loss, neg-val-loss or "
        "neg-balanced-val-loss"
    )


def reinforce_gradient(
    mu: list[float], thetas: list[list[float]], rewards: list[float], sigma: float
) -> list[float] | None:
    """Score-function estimate of d E[R] / d mu = E[z (theta - mu) / sigma^2] over the samples given.

    Pass only the sampled (noisy) thetas: an elite sample (theta = mu) adds nothing to the sum but would
    shift the mean and scale of the z-scores (see `update_rewards`).
    """
    z = normalized(rewards)
    if z is None:
        return None
    n = len(thetas)
    grad = [0.0] * len(mu)
    for zi, th in zip(z, thetas, strict=True):
        for k, (t, m) in enumerate(zip(th, mu, strict=True)):
            grad[k] += zi * (t - m) / (sigma * sigma) / n
    return grad


FLOOR_MARGIN = 0.01
"""Smallest gap between the worst finite reward of an epoch and the floor given to a diverged sample."""


def diverged_floor(valid: list[float]) -> float:
    """The reward a diverged sample counts with in the update: the epoch's worst finite reward minus the
    spread of its finite rewards (at least FLOOR_MARGIN), so it ranks clearly below every sample that trained."""
    lo, hi = min(valid), max(valid)
    return lo - max(hi - lo, FLOOR_MARGIN)


def update_rewards(rewards: list[float | None], diverged: list[bool], elitism: bool) -> list[float | None]:
    """The reward each sample of an epoch counts with in the REINFORCE update (None: left out).

    * A sample that trained counts with its reward.
    * A diverged sample (loss or weights non-finite) counts with `diverged_floor` of the epoch's finite
      rewards, so the update moves mu away from losses that blow up instead of ignoring them.
    * Failures of the infrastructure (neither rewarded nor diverged) are left out: they say nothing
      about the loss.
    * With elitism, sample 0 (theta = mu) is left out: its score term is zero, and inside the z-scores it
      only moves their mean and scale. (Rewards [0.9, 0.8, 0.8, 0.8] would otherwise give the three
      sampled thetas equal negative weights and push mu against their sum, a random direction.)
    """
    valid = [r for r in rewards if r is not None]
    floor = diverged_floor(valid) if valid else None
    out: list[float | None] = []
    for i, (r, bad) in enumerate(zip(rewards, diverged, strict=True)):
        if elitism and i == 0:
            out.append(None)
        elif r is not None:
            out.append(r)
        else:
            out.append(floor if bad else None)
    return out


def adam_ascent(
    mu: list[float],
    grad: list[float],
    state: AdamState,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[list[float], AdamState]:
    m = state.m or [0.0] * len(mu)
    v = state.v or [0.0] * len(mu)
    step = state.step + 1
    m = [beta1 * a + (1 - beta1) * g for a, g in zip(m, grad, strict=True)]
    v = [beta2 * a + (1 - beta2) * g * g for a, g in zip(v, grad, strict=True)]
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    new_mu = [x + lr * (a / c1) / (math.sqrt(b / c2) + eps) for x, a, b in zip(mu, m, v, strict=True)]
    return new_mu, AdamState(step=step, m=m, v=v)


def clip_to(mu: list[float], center: list[float], bound: float) -> list[float]:
    """Project mu onto the box |mu - center| <= bound (per coordinate)."""
    return [min(max(m, c - bound), c + bound) for m, c in zip(mu, center, strict=True)]


def best_index(rewards: list[float | None]) -> int | None:
    """Highest reward; ties go to the lowest index."""
    best: int | None = None
    best_r = -math.inf
    for i, r in enumerate(rewards):
        if r is not None and (best is None or r > best_r):
            best, best_r = i, r
    return best
