"""The AM-LFS unified space: L = -log tau(p_y^t), t and tau piecewise-linear on M equal intervals.

Three parameterisations of the same functions:

* ``paper`` (AM-LFS, Li et al., ICCV 2019): theta = [a^t, b^t, a^tau, b^tau], 4M numbers, an independent
  slope and intercept per piece. Identity: slopes 1, intercepts 0. Sampling noise can make slopes negative
  and intercepts large, which destroys training (measured: collapse on mnist1d at sigma=0.2).
* ``monotone``: theta = [d_0 .. d_M, u_0 .. u_{M-1}], 2M+1 numbers.
  t(x) = x + delta(x), delta continuous and piecewise-linear with value d_k / s at the M+1 knots x_k, where s
  is the logit scale (the cosine head's scale, 1 for linear heads): d is a shift of the target's *logit*, in
  logits, whatever the head (d < 0 is a margin; CosFace is d_k = -s m everywhere). tau is continuous from
  tau(0) = 0 with slope exp(u_k) on piece k. Identity is theta = 0. t is kept increasing (slopes >= 1e-3,
  which sigma-sized noise never reaches) and tau is increasing by construction, so every sample is a mild,
  monotone reshaping: sigma = 0.2 moves the target logit by about 0.2 at each knot and tau's slopes by
  a factor exp(+-0.2). tau(0) = 0: the loss is unbounded, and on its first piece (p < 1/M) tau is linear
  from 0, so the hardest examples (the mislabelled ones, under label noise) keep cross-entropy's gradient.
* ``bounded`` (default): theta = [d_0 .. d_M, w], M+2 numbers. t as in monotone; tau(p) = tau0 + (1 - tau0) p
  with tau0 = FLOOR_SCALE max(w, 0) (at most FLOOR_MAX): cross-entropy whose target probability is floored,
  L = -log(tau0 + (1 - tau0) p), bounded by -log tau0. Rows with p well below tau0 lose their gradient (the
  weight of the target logit's gradient relative to cross-entropy is (1 - tau0) p / tau), so likely-mislabelled
  examples are ignored; samples with w <= 0 are plain cross-entropy, so a search whose mu drifts below 0 (clean
  data: the floor slows learning) mostly samples cross-entropy. Identity is theta = 0.

  With search.priorAdjustment (the default), theta = [d_0 .. d_M, w, c], M+3 numbers: c is the strength of a
  logit adjustment (Menon et al., ICLR 2021), a = PRIOR_SCALE max(c, 0) (at most PRIOR_MAX): the loss sees the
  logits plus a log pi, pi the training split's class priors (the program's ``logitAdjust``). a = 0 is the loss
  without it; a = 1 makes cross-entropy Bayes-consistent for the balanced error. On balanced training data
  log pi is constant and c changes nothing.

  Every sampled loss also carries Poly-1's epsilon (1 - p) term (the program's ``poly``), fixed at
  search.polyTerm (default 1; init.polyEpsilon when the search starts from init.preset poly1): the search moves
  t, the floor and c around Poly-1 instead of cross-entropy. (As a searched coordinate the term was pushed down
  on every task; see below.)

  Two simpler forms collapsed training on mnist1d and are not used. Slopes of t integrated from the left end
  of its domain turn small slope noise into logit shifts of several units in the middle of the domain
  (measured: 52% test accuracy vs 83% for best-of-4 selection with cross-entropy). A free offset tau(0) that
  may go negative lets negative samples clamp tau at the floor for hard examples (their gradient vanishes) while
  positive ones only slowly shrink the gradient of every hard example, so REINFORCE pushes it up epoch after
  epoch and training stalls (49%). The bounded form's floor never goes below 0 and is combined with common
  random numbers and antithetic samples in the default search (see docs/results.md). A further coordinate
  scaling a (1 - p) term (Poly-1/MAE-like, an effective step size on confident examples) was tried and
  dropped: per-epoch rewards pushed it down on every task (a greedy, short-horizon preference for smaller
  steps), although a fixed positive value helps under label noise.

All produce the same loss program: per-piece slopes and intercepts of t on [lo, hi] and of tau on [0, 1].
"""

from __future__ import annotations

import math

from amlfs.spaces.base import Program, Space, SpaceConfig, preset_t, preset_tau
from amlfs.spec import REPRESENTABLE, InitSpec

MIN_SLOPE = 1e-3


def _knots(lo: float, hi: float, m: int) -> list[float]:
    return [lo + (hi - lo) * k / m for k in range(m + 1)]


def _ab_from_knots(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    a = [(ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k]) for k in range(len(xs) - 1)]
    b = [ys[k] - a[k] * xs[k] for k in range(len(xs) - 1)]
    return a, b


def _monotone_t(d: list[float], cfg: SpaceConfig) -> tuple[list[float], list[float]]:
    """Per-piece (a, b) of t(x) = x + delta(x), delta(x_k) = d_k / s, kept increasing."""
    m = cfg.intervals
    xs = _knots(cfg.t_lo, cfg.t_hi, m)
    h = (cfg.t_hi - cfg.t_lo) / m
    ys = [xs[0] + d[0] / cfg.logit_scale]
    for k in range(1, m + 1):
        ys.append(max(xs[k] + d[k] / cfg.logit_scale, ys[-1] + MIN_SLOPE * h))
    return _ab_from_knots(xs, ys)


def _monotone_tau(u: list[float]) -> tuple[list[float], list[float]]:
    """Per-piece (a, b) of tau: tau(0) = 0, slope exp(u_k) on piece k of [0, 1], continuous."""
    m = len(u)
    xs = _knots(0.0, 1.0, m)
    a = [math.exp(min(v, 30.0)) for v in u]
    b, y = [], 0.0
    for k in range(m):
        b.append(y - a[k] * xs[k])
        y += a[k] * (xs[k + 1] - xs[k])
    return a, b


FLOOR_SCALE = 0.25  # tau0 per unit of the floor coordinate w: sigma = 0.2 explores tau0 up to about 0.05
FLOOR_MAX = 0.5


def floor_of(w: float) -> float:
    """tau0 = tau(0) / tau(1) of the bounded parameterisation: FLOOR_SCALE w, clipped to [0, FLOOR_MAX]."""
    return min(max(FLOOR_SCALE * w, 0.0), FLOOR_MAX)


def w_of_floor(tau0: float) -> float:
    return min(max(tau0, 0.0), FLOOR_MAX) / FLOOR_SCALE


PRIOR_SCALE = 2.0  # logit-adjustment strength a per unit of c: sigma = 0.2 explores a by +-0.4, muBound 1 reaches 2
PRIOR_MAX = 4.0


def prior_of(c: float) -> float:
    """The logit-adjustment strength a of the coordinate c: PRIOR_SCALE c, clipped to [0, PRIOR_MAX]."""
    return min(max(PRIOR_SCALE * c, 0.0), PRIOR_MAX)


def c_of_prior(a: float) -> float:
    return min(max(a, 0.0), PRIOR_MAX) / PRIOR_SCALE


def _bounded_tau(w: float, m: int) -> tuple[list[float], list[float]]:
    """Per-piece (a, b) of tau(p) = tau0 + (1 - tau0) p on M pieces of [0, 1]."""
    tau0 = floor_of(w)
    return [1.0 - tau0] * m, [tau0] * m


class AmlfsSpace(Space):
    name = "amlfs"

    def dim(self, cfg: SpaceConfig) -> int:
        m = cfg.intervals
        return {"paper": 4 * m, "bounded": m + 2 + cfg.prior_adjustment}.get(cfg.parameterization, 2 * m + 1)

    def identity(self, cfg: SpaceConfig) -> list[float]:
        m = cfg.intervals
        if cfg.parameterization == "paper":
            return [1.0] * m + [0.0] * m + [1.0] * m + [0.0] * m
        return [0.0] * self.dim(cfg)

    def names(self, cfg: SpaceConfig) -> list[str]:
        m = range(cfg.intervals)
        if cfg.parameterization == "paper":
            return [f"{g}_{k}" for g in ("a_t", "b_t", "a_tau", "b_tau") for k in m]
        t_names = [f"d_t_{k}" for k in range(cfg.intervals + 1)]
        if cfg.parameterization == "bounded":
            return [*t_names, "floor", *(["logit_adjust"] if cfg.prior_adjustment else [])]
        return t_names + [f"u_tau_{k}" for k in m]

    def from_preset(self, init: InitSpec, cfg: SpaceConfig) -> list[float]:
        par = cfg.parameterization
        if init.preset not in REPRESENTABLE[par]:
            raise ValueError(f"preset {init.preset!r} is not representable in the {par} parameterization")
        m = cfg.intervals
        txs = _knots(cfg.t_lo, cfg.t_hi, m)
        pxs = _knots(0.0, 1.0, m)
        tys = [preset_t(init, x) for x in txs]
        pys = [preset_tau(init, p) for p in pxs]
        if par == "paper":
            at, bt = _ab_from_knots(txs, tys)
            ap, bp = _ab_from_knots(pxs, pys)
            return at + bt + ap + bp
        d = [(ty - x) * cfg.logit_scale for ty, x in zip(tys, txs, strict=True)]
        if par == "bounded":  # tau(0) exactly; in between, linear (gce and mae are approximated; poly1's
            # epsilon (1 - p) is not a tau: it is a fixed term of every sampled loss, see `program`)
            prior = [c_of_prior(init.logit_adjustment)] if cfg.prior_adjustment else []
            return [*d, w_of_floor(pys[0] / pys[-1]), *prior]
        up = [math.log(max((pys[k + 1] - pys[k]) * m, MIN_SLOPE)) for k in range(m)]
        return [*d, *up]

    def program(self, theta: list[float], cfg: SpaceConfig) -> Program:
        m = cfg.intervals
        if len(theta) != self.dim(cfg):
            raise ValueError(
                f"theta has {len(theta)} numbers, the amlfs/{cfg.parameterization} space with "
                f"M={m} needs {self.dim(cfg)}"
            )
        if cfg.parameterization == "paper":
            at, bt, ap, bp = (list(theta[i * m : (i + 1) * m]) for i in range(4))
        elif cfg.parameterization == "bounded":
            at, bt = _monotone_t(list(theta[: m + 1]), cfg)
            ap, bp = _bounded_tau(theta[m + 1], m)
        else:
            at, bt = _monotone_t(list(theta[: m + 1]), cfg)
            ap, bp = _monotone_tau(list(theta[m + 1 :]))
        program: Program = {
            "kind": "piecewise",
            "t": {"lo": cfg.t_lo, "hi": cfg.t_hi, "a": at, "b": bt},
            "tau": {"lo": 0.0, "hi": 1.0, "a": ap, "b": bp},
        }
        if cfg.parameterization == "bounded" and cfg.prior_adjustment:
            program["logitAdjust"] = prior_of(theta[m + 2])  # also when 0: the search owns it
        if cfg.parameterization == "bounded" and cfg.poly:
            program["poly"] = cfg.poly
        return program
