"""The AM-LFS unified space: L = -log tau(p_y^t), t and tau piecewise-linear on M equal intervals.

Two parameterisations of the same functions:

* ``paper`` (AM-LFS, Li et al., ICCV 2019): theta = [a^t, b^t, a^tau, b^tau], 4M numbers, an independent
  slope and intercept per piece. Identity: slopes 1, intercepts 0. Sampling noise can make slopes negative
  and intercepts large, which destroys training (measured: collapse on mnist1d at sigma=0.2).
* ``monotone`` (default): theta = [u^t (M), c^t, u^tau (M), c^tau], 2M+2 numbers. Piece k of t has slope
  exp(u^t_k); t is continuous and starts at t(lo) = lo + c^t. tau likewise from tau(0) = c^tau. Slopes are
  always positive, so every sample is a continuous, strictly increasing reshaping of the logit and the
  probability; identity is theta = 0. A coordinate's noise multiplies a slope by exp(+-sigma).

Both produce the same loss program: per-piece slopes and intercepts of t on [lo, hi] and of tau on [0, 1].
"""

from __future__ import annotations

import math

from amlfs.spaces.base import Program, Space, SpaceConfig, preset_t, preset_tau
from amlfs.spec import InitSpec

MIN_SLOPE = 1e-3


def _knots(lo: float, hi: float, m: int) -> list[float]:
    return [lo + (hi - lo) * k / m for k in range(m + 1)]


def _ab_from_knots(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    a = [(ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k]) for k in range(len(xs) - 1)]
    b = [ys[k] - a[k] * xs[k] for k in range(len(xs) - 1)]
    return a, b


def _monotone_fn(u: list[float], c: float, lo: float, hi: float) -> tuple[list[float], list[float]]:
    m = len(u)
    h = (hi - lo) / m
    xs = _knots(lo, hi, m)
    a = [math.exp(min(v, 30.0)) for v in u]
    ys = [lo + c]
    for k in range(m):
        ys.append(ys[-1] + a[k] * h)
    b = [ys[k] - a[k] * xs[k] for k in range(m)]
    return a, b


class AmlfsSpace(Space):
    name = "amlfs"

    def dim(self, cfg: SpaceConfig) -> int:
        return 4 * cfg.intervals if cfg.parameterization == "paper" else 2 * cfg.intervals + 2

    def identity(self, cfg: SpaceConfig) -> list[float]:
        m = cfg.intervals
        if cfg.parameterization == "paper":
            return [1.0] * m + [0.0] * m + [1.0] * m + [0.0] * m
        return [0.0] * (2 * m + 2)

    def names(self, cfg: SpaceConfig) -> list[str]:
        m = range(cfg.intervals)
        if cfg.parameterization == "paper":
            return [f"{g}_{k}" for g in ("a_t", "b_t", "a_tau", "b_tau") for k in m]
        return [f"u_t_{k}" for k in m] + ["c_t"] + [f"u_tau_{k}" for k in m] + ["c_tau"]

    def from_preset(self, init: InitSpec, cfg: SpaceConfig) -> list[float]:
        m = cfg.intervals
        txs = _knots(cfg.t_lo, cfg.t_hi, m)
        pxs = _knots(0.0, 1.0, m)
        tys = [preset_t(init, x) for x in txs]
        pys = [preset_tau(init, p) for p in pxs]
        if cfg.parameterization == "paper":
            at, bt = _ab_from_knots(txs, tys)
            ap, bp = _ab_from_knots(pxs, pys)
            return at + bt + ap + bp
        h_t = (cfg.t_hi - cfg.t_lo) / m
        ut = [math.log(max((tys[k + 1] - tys[k]) / h_t, MIN_SLOPE)) for k in range(m)]
        up = [math.log(max((pys[k + 1] - pys[k]) * m, MIN_SLOPE)) for k in range(m)]
        return [*ut, tys[0] - cfg.t_lo, *up, pys[0]]

    def program(self, theta: list[float], cfg: SpaceConfig) -> Program:
        m = cfg.intervals
        if len(theta) != self.dim(cfg):
            raise ValueError(f"theta has {len(theta)} numbers, the amlfs/{cfg.parameterization} space with "
                             f"M={m} needs {self.dim(cfg)}")
        if cfg.parameterization == "paper":
            at, bt, ap, bp = (list(theta[i * m:(i + 1) * m]) for i in range(4))
        else:
            at, bt = _monotone_fn(list(theta[:m]), theta[m], cfg.t_lo, cfg.t_hi)
            ap, bp = _monotone_fn(list(theta[m + 1:2 * m + 1]), theta[2 * m + 1], 0.0, 1.0)
        return {"kind": "piecewise",
                "t": {"lo": cfg.t_lo, "hi": cfg.t_hi, "a": at, "b": bt},
                "tau": {"lo": 0.0, "hi": 1.0, "a": ap, "b": bp}}
