"""The AM-LFS unified space: L = -log tau(p_y^t), t and tau piecewise-linear on M equal intervals.

Two parameterisations of the same functions:

* ``paper`` (AM-LFS, Li et al., ICCV 2019): theta = [a^t, b^t, a^tau, b^tau], 4M numbers, an independent
  slope and intercept per piece. Identity: slopes 1, intercepts 0. Sampling noise can make slopes negative
  and intercepts large, which destroys training (measured: collapse on mnist1d at sigma=0.2).
* ``monotone`` (default): theta = [d_0 .. d_M, u_0 .. u_{M-1}], 2M+1 numbers.
  t(x) = x + delta(x), delta continuous and piecewise-linear with value d_k / s at the M+1 knots x_k, where s
  is the logit scale (the cosine head's scale, 1 for linear heads): d is a shift of the target's *logit*, in
  logits, whatever the head (d < 0 is a margin; CosFace is d_k = -s m everywhere). tau is continuous from
  tau(0) = 0 with slope exp(u_k) on piece k. Identity is theta = 0. t is kept increasing (slopes >= 1e-3,
  which sigma-sized noise never reaches) and tau is increasing by construction, so every sample is a mild,
  monotone reshaping: sigma = 0.2 moves the target logit by about 0.2 at each knot and tau's slopes by
  a factor exp(+-0.2).

  Two simpler forms collapsed training on mnist1d and are not used. Slopes of t integrated from the left end
  of its domain turn small slope noise into logit shifts of several units in the middle of the domain
  (measured: 52% test accuracy vs 83% for best-of-4 selection with cross-entropy). A free offset tau(0) lets
  negative samples clamp tau at the floor for hard examples (their gradient vanishes) while positive ones only
  slowly shrink the gradient of every hard example, so REINFORCE pushes it up epoch after epoch and training
  stalls (49%).

Both produce the same loss program: per-piece slopes and intercepts of t on [lo, hi] and of tau on [0, 1].
"""

from __future__ import annotations

import math

from amlfs.spaces.base import Program, Space, SpaceConfig, preset_t, preset_tau
from amlfs.spec import BOUNDED_PRESETS, InitSpec

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


class AmlfsSpace(Space):
    name = "amlfs"

    def dim(self, cfg: SpaceConfig) -> int:
        return 4 * cfg.intervals if cfg.parameterization == "paper" else 2 * cfg.intervals + 1

    def identity(self, cfg: SpaceConfig) -> list[float]:
        m = cfg.intervals
        if cfg.parameterization == "paper":
            return [1.0] * m + [0.0] * m + [1.0] * m + [0.0] * m
        return [0.0] * (2 * m + 1)

    def names(self, cfg: SpaceConfig) -> list[str]:
        m = range(cfg.intervals)
        if cfg.parameterization == "paper":
            return [f"{g}_{k}" for g in ("a_t", "b_t", "a_tau", "b_tau") for k in m]
        return [f"d_t_{k}" for k in range(cfg.intervals + 1)] + [f"u_tau_{k}" for k in m]

    def from_preset(self, init: InitSpec, cfg: SpaceConfig) -> list[float]:
        if init.preset == "label-smoothing":
            raise ValueError("preset 'label-smoothing' is not a loss of the target probability; not representable")
        if cfg.parameterization == "monotone" and init.preset in BOUNDED_PRESETS:
            raise ValueError(f"preset {init.preset!r} has tau(0) > 0; the monotone parameterization keeps tau(0) = 0")
        m = cfg.intervals
        txs = _knots(cfg.t_lo, cfg.t_hi, m)
        pxs = _knots(0.0, 1.0, m)
        tys = [preset_t(init, x) for x in txs]
        pys = [preset_tau(init, p) for p in pxs]
        if cfg.parameterization == "paper":
            at, bt = _ab_from_knots(txs, tys)
            ap, bp = _ab_from_knots(pxs, pys)
            return at + bt + ap + bp
        d = [(ty - x) * cfg.logit_scale for ty, x in zip(tys, txs, strict=True)]
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
        else:
            at, bt = _monotone_t(list(theta[: m + 1]), cfg)
            ap, bp = _monotone_tau(list(theta[m + 1 :]))
        return {
            "kind": "piecewise",
            "t": {"lo": cfg.t_lo, "hi": cfg.t_hi, "a": at, "b": bt},
            "tau": {"lo": 0.0, "hi": 1.0, "a": ap, "b": bp},
        }
