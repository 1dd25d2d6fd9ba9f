"""Loss programs -> PyTorch losses.

A search space (``amlfs.spaces``) turns a parameter vector into a *loss program*, a plain JSON dict;
`build_loss` turns a program into an ``nn.Module`` with ``module(outputs, target) -> loss``.

Notation. ``outputs`` is ``z`` of shape (B, C): logits for ``head="linear"`` or cosines in [-1, 1] for
``head="cosine"`` (the model applies no scale; here ``s = scale``, and ``s = 1`` for the linear head).
``y`` is the target class of a row and ``x = z_y`` its target entry.

Program kinds:

* ``piecewise`` (AM-LFS, Li et al., ICCV 2019): ``L = -log tau(p)`` with ``p = softmax(l)_y``, where the
  logits are ``l_j = s z_j`` for ``j != y`` and ``l_y = s t(x)``. ``t`` and ``tau`` are piecewise-linear:
  ``f(x) = a_k x + b_k`` with ``k = clamp(floor((x - lo) / (hi - lo) M), 0, M - 1)`` (the end pieces extend
  beyond [lo, hi]), exactly as ``amlfs.spaces.base.evaluate``. ``tau`` lives on [0, 1].
* ``search-softmax`` (Wang et al., ICML 2020): ``L = -log p_m``, ``p_m = p / (a p + 1 - a)`` with
  ``a = a[bin(p)]``, K equal bins of p on [0, 1], ``a <= 0``. No target transform.
* ``preset``: the exact baseline losses softmax (with label smoothing), label-smoothing, cosface, arcface,
  focal, gce ``(1 - p^q) / q`` (Zhang & Sabuncu, 2018), mae ``2 (1 - p)``, sce ``alpha CE + beta RCE`` with
  ``RCE = -ln(1e-4) (1 - p)`` (Wang et al., ICCV 2019) and poly1 ``CE + epsilon (1 - p)`` (Leng et al., 2022).

Any program may carry ``classBalance: beta`` (Cui et al., CVPR 2019): each row's loss is weighted by
``w_y = (1 - beta) / (1 - beta^n_y)``, ``n_y`` the training examples of its class, normalised so that the
weights of the classes average 1. Any program may also carry ``logitAdjust: a`` (logit adjustment, Menon et
al., ICLR 2021): the loss sees the logits plus ``a log pi``, ``pi_c = n_c / sum n`` the training split's class
priors, i.e. ``l_j + a log pi_j`` for every class j (after the scale s and the target transform t; centred so
that the shifts average 0, which softmax ignores). ``a = 0`` is the program itself; for cross-entropy ``a = 1``
is Bayes-consistent for the balanced error. The network's own logits (at test time) are not shifted. Both need
``class_counts`` in `build_loss`. A ``piecewise`` or ``search-softmax`` program may carry ``poly: epsilon``:
the rows' loss plus ``epsilon (1 - p)`` with the same p (Poly-1's term, Leng et al., ICLR 2022: on the
identity program it is the ``poly1`` preset exactly).

Numerics of ``tau`` (piecewise). Every piece is classified once, when the module is built:

* *positive* pieces (``a > 0`` and ``b >= 0``): ``tau(p) >= a p > 0`` for every p > 0, so no floor is
  needed and ``log tau = logaddexp(log a + log p, log b)`` is evaluated in log space from ``log p``
  (``log_softmax``). This is exact even when p underflows: the identity ``a = 1, b = 0`` gives
  ``log tau = log p`` bit for bit, i.e. plain cross-entropy, for losses of any size.
* all other pieces can reach ``tau <= 0``: ``L = -log max(a p + b, TAU_FLOOR)`` with ``p = exp(log p)``.
  A clamped row has loss ``-log TAU_FLOOR`` and zero gradient. (A piece with ``b < 0`` that stays
  positive on its own interval is also treated this way; it never reaches the floor, and its relative
  error is float32's times the condition number ``(|a p| + |b|) / tau``.)

The floor is therefore not applied to positive pieces: the identity must stay cross-entropy for any
loss (``-log TAU_FLOOR`` is only 27.6), and those pieces cannot reach 0. When all pieces are positive
only the log-space form is computed. When tau is positive on every piece's own p-interval and the piece
that contains p = 0 has b = 0 (every program of the monotone space: tau(0) = 0, increasing), the *ratio
form* ``log tau = log p + log(a + b / p)`` is used: exact for b = 0 at any p, and b / p is bounded on the
other pieces (p >= 1/M); no floor is needed. Otherwise both the direct and the log-space form are
computed and the larger is kept (positive pieces: the direct
value equals the log-space one to float32 rounding, or is lower where p underflows; other pieces carry
``log a = log b = -inf`` in the log-space columns, so their direct value is kept).

Before that, an intercept that is negligible on its piece (``|b| <= 2^-40 a p_min`` with ``p_min > 0`` the
left end of the piece, i.e. below float32 resolution) is set to 0 so that float noise in an identity
program (``b = +-1e-17``) keeps the exact log-space path.

Performance. The piecewise and search-softmax kinds (and cosface) run through one autograd Function
with a hand-written backward (no autograd graph inside). Only the target column is touched: one gather
of ``x``, one ``bucketize`` and ``index_select`` per function (none when M = 1) on tables registered as
buffers (moved to the outputs' device once), one scatter, one ``log_softmax``; tau's pieces are looked
up on ``p - 1 = expm1(log p)``, which the gradient needs anyway. No host syncs, no Python loops over
pieces, no boolean-mask indexing; float32 throughout (bf16/fp16 outputs are upcast; float64 stays
float64). Identity t or tau (and M = 1) skip their lookups. With ``g = d log tau / d log p``::

    dL/dz_j = g s q_j               (j != y)        q = softmax(l)
    dL/dz_y = g t'(x) s (q_y - 1)

Non-finite outputs are never hidden: the loss is poisoned with ``0 * sum(z)`` (NaN whenever ``z`` has a
NaN or an infinity anywhere, including a ``-inf`` non-target logit that ``cross_entropy`` would accept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TAU_FLOOR: float = 1e-12
"""``tau`` is clamped to this before the log wherever a piece can reach ``tau <= 0``."""

HEADS = ("linear", "cosine")
PRESETS = ("softmax", "cosface", "arcface", "focal", "gce", "mae", "sce", "label-smoothing", "poly1")
RCE_A = math.log(1e-4)  # reverse cross-entropy's log of a zero label (clipped at 1e-4, as in the SCE reference)
REDUCTIONS = ("mean", "none")
_NEGLIGIBLE = 2.0**-40


# --- program validation -------------------------------------------------------------------------


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _numbers(value: Any, where: str) -> list[float]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{where}: expected a non-empty list of numbers, got {value!r}")
    return [_number(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _mapping(value: Any, where: str, allowed: Sequence[str], required: Sequence[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise ValueError(f"{where}.{key}: unknown field; expected {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise ValueError(f"{where}.{key}: missing")
    return value


def _piecewise_fn(value: Any, where: str) -> tuple[float, float, list[float], list[float]]:
    fn = _mapping(value, where, ("lo", "hi", "a", "b"), ("lo", "hi", "a", "b"))
    lo, hi = _number(fn["lo"], f"{where}.lo"), _number(fn["hi"], f"{where}.hi")
    if not hi > lo:
        raise ValueError(f"{where}.hi: must be greater than lo ({lo}), got {hi}")
    a, b = _numbers(fn["a"], f"{where}.a"), _numbers(fn["b"], f"{where}.b")
    if len(a) != len(b):
        raise ValueError(f"{where}.b: has {len(b)} entries but {where}.a has {len(a)}")
    return lo, hi, a, b


def _interior_knots(lo: float, hi: float, m: int) -> list[float]:
    return [lo + (hi - lo) * k / m for k in range(1, m)]


# --- the fast path: target transform t, probability transform tau ----------------------------------

_COMPUTE_DTYPES = (torch.float32, torch.float64)


class _TargetLossFn(torch.autograd.Function):
    """Rows: ``-log tau(p)``, ``p = softmax(l)_y``, ``l = s z`` with ``l_y = s t(z_y)``. See module doc.

    Per-row tensors are kept as (B, 1) so that no squeeze/unsqueeze is needed around gather/scatter.
    """

    @staticmethod
    def forward(ctx: Any, outputs: Tensor, target: Tensor, loss: _TargetLoss, mean: bool) -> Tensor:
        z = outputs if outputs.dtype in _COMPUTE_DTYPES else outputs.float()
        y = target.reshape(-1, 1) if target.dtype == torch.int64 else target.reshape(-1, 1).long()
        need_grad = ctx.needs_input_grad[0]
        s = loss.scale
        if loss.t_tab is None:
            logits = z * s if s != 1.0 else z
            t_slope = None
        else:
            tl, t_slope = loss.target_logit(z.gather(1, y))
            logits = (z * s).scatter_(1, y, tl) if s != 1.0 else z.scatter(1, y, tl)
        logits = loss.shifted(logits)  # logit adjustment: the softmax below is of the shifted logits
        logp_all = torch.log_softmax(logits, 1)
        logp = logp_all.gather(1, y)
        pm1 = torch.expm1(logp)  # p - 1
        lt, g = loss.log_tau(logp, pm1, need_grad)
        if loss.poly != 0.0:  # L = -log tau - eps (p - 1); d(-L)/d log p = g + eps p
            lt = torch.add(lt, pm1, alpha=loss.poly)
            if need_grad:
                p_eps = torch.add(pm1, 1.0).mul_(loss.poly)
                g = p_eps.add_(1.0) if g is None else g.add_(p_eps)
        if mean:  # 0 * sum(z) is NaN when z holds a NaN or an infinity anywhere
            out = torch.add(lt.mean(), z.sum(), alpha=0.0).neg_()
        else:
            out = torch.add(lt.view(-1), z.sum(1), alpha=0.0).neg_()
        if need_grad:
            # dL/dz_j = g s w q_j (j != y), dL/dz_y = g t'(x) s w (q_y - 1); w = 1/B for the mean
            c = s / z.shape[0] if mean else s
            g_other: Tensor | float = c if g is None else g.mul_(c)
            g_target = pm1 * g_other if t_slope is None else torch.mul(pm1, t_slope).mul_(g_other)
            if isinstance(g_other, Tensor):
                ctx.save_for_backward(logp_all, y, g_target, g_other)
            else:
                ctx.save_for_backward(logp_all, y, g_target)
                ctx.g_other = g_other
            ctx.in_dtype = outputs.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logp_all, y, g_target, *rest = ctx.saved_tensors
        grad = logp_all.exp().mul_(rest[0] if rest else ctx.g_other)
        grad.scatter_(1, y, g_target)
        grad.mul_(grad_out if grad_out.dim() == 0 else grad_out.view(-1, 1))
        return (grad if grad.dtype == ctx.in_dtype else grad.to(ctx.in_dtype)), None, None, None


class _LogitLoss(nn.Module):
    """Base of every loss on logits: holds the logit adjustment's per-class shift (None: none; set by
    `build_loss` for a program with ``logitAdjust``)."""

    shift: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", None, persistent=False)

    def shifted(self, logits: Tensor) -> Tensor:
        """The logits plus the shift."""
        return logits if self.shift is None else logits + self.shift.to(device=logits.device, dtype=logits.dtype)


class _TargetLoss(_LogitLoss):
    """Base of the fast kinds. Subclasses fill their tau buffers and implement `log_tau`.

    Buffers: ``t_knots`` (M-1 interior knots of t, None when M = 1) and ``t_tab`` (columns: slope and
    intercept of ``s t``, and the slope of ``t``; see `_table`; None when t is the identity).
    """

    t_knots: Tensor | None
    t_tab: Tensor | None

    def __init__(
        self, head: str, scale: float, reduction: str, t: tuple[float, float, list[float], list[float]] | None
    ) -> None:
        super().__init__()
        self.head, self.reduction = head, reduction
        self.scale = float(scale) if head == "cosine" else 1.0
        self.poly = 0.0  # epsilon of an added epsilon (1 - p) (the program's ``poly``; set by `build_loss`)
        self._mean = reduction == "mean"
        self._device: torch.device | None = None
        knots, tab = None, None
        if t is not None and not all(a == 1.0 and b == 0.0 for a, b in zip(t[2], t[3], strict=True)):
            lo, hi, a, b = t
            s = self.scale
            tab = _table([[s * ak, s * bk, ak] for ak, bk in zip(a, b, strict=True)])
            if len(a) > 1:
                knots = torch.tensor(_interior_knots(lo, hi, len(a)), dtype=torch.float32)
        self.register_buffer("t_knots", knots, persistent=False)
        self.register_buffer("t_tab", tab, persistent=False)

    def target_logit(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(s t(x), t'(x))`` for the target entries ``x`` of shape (B, 1); t must not be the identity."""
        assert self.t_tab is not None
        s_slope, s_intercept, slope = _lookup(self.t_tab, self.t_knots, x)
        return torch.addcmul(s_intercept, s_slope, x), slope

    def log_tau(self, logp: Tensor, pm1: Tensor | None = None, need_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(log tau(p), d log tau / d log p)`` from ``log p`` and ``p - 1`` (B, 1); None means 1."""
        raise NotImplementedError

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        _check_inputs(outputs, target)
        if self._device is not None and self._device != outputs.device:
            self.to(outputs.device)
        return _TargetLossFn.apply(outputs, target, self, self._mean)

    def _apply(self, fn: Any, recurse: bool = True) -> _TargetLoss:
        super()._apply(fn, recurse)
        self._track_device()
        return self

    def _track_device(self) -> None:
        """Remember where the buffers are, so that forward moves them to the outputs' device once."""
        self._device = next((buf.device for buf in self.buffers()), None)

    def extra_repr(self) -> str:
        poly = f", poly={self.poly}" if self.poly else ""
        return f"head={self.head}, scale={self.scale}, reduction={self.reduction}{poly}"


def _check_inputs(outputs: Tensor, target: Tensor) -> None:
    if outputs.dim() != 2 or target.dim() != 1 or target.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"expected outputs (B, C) and target (B,), got {tuple(outputs.shape)} and {tuple(target.shape)}"
        )


def _table(rows: list[list[float]]) -> Tensor:
    """Per-piece columns as an (M, 1, ncol) table, or (1, ncol) for one piece (see `_lookup`)."""
    tab = torch.tensor(rows, dtype=torch.float32).unsqueeze(1)
    return tab[0] if len(rows) == 1 else tab


def _lookup(tab: Tensor, knots: Tensor | None, v: Tensor) -> tuple[Tensor, ...]:
    """The columns of ``tab`` at the pieces of ``v`` (B, 1): (B, 1) each, or (1,) for one piece."""
    if knots is not None:
        tab = tab.index_select(0, torch.bucketize(v.view(-1), knots, right=True))
    return (tab if tab.dtype == v.dtype else tab.to(v.dtype)).unbind(-1)


class PiecewiseLoss(_TargetLoss):
    """AM-LFS unified loss ``L = -log tau(p_y^t)`` with piecewise-linear t and tau (see module doc).

    ``tau_tab`` columns: log a and log b when all pieces are positive; a and b for the ratio form;
    otherwise log a, log b (-inf for b = 0 and for pieces that are not positive), a, b and the floor of the
    piece (``TAU_FLOOR``, or -1 for positive pieces, which need none). ``tau_knots`` are the interior knots
    of tau minus 1: pieces are looked up on p - 1.
    """

    tau_knots: Tensor | None
    tau_tab: Tensor | None

    def __init__(self, program: dict[str, Any], head: str, scale: float, reduction: str = "mean") -> None:
        _mapping(program, "program", ("kind", "t", "tau"), ("kind", "t", "tau"))
        t = _piecewise_fn(program["t"], "program.t")
        lo, hi, a, b = _piecewise_fn(program["tau"], "program.tau")
        super().__init__(head, scale, reduction, t)
        m = len(a)
        rows: list[list[float]] = []
        ratio = True
        for k in range(m):
            p_min = lo + (hi - lo) * k / m
            bk = 0.0 if a[k] > 0 and p_min > 0 and abs(b[k]) <= _NEGLIGIBLE * a[k] * p_min else b[k]
            pos = a[k] > 0 and bk >= 0
            rows.append(
                [
                    math.log(a[k]) if pos else -math.inf,
                    math.log(bk) if pos and bk > 0 else -math.inf,
                    a[k],
                    bk,
                    -1.0 if pos else TAU_FLOOR,
                ]
            )
            # the ratio form needs tau > 0 on the piece's p-interval (within [0, 1]) and p bounded away from
            # 0 there, or b = 0
            p_lo = 0.0 if k == 0 else min(max(p_min, 0.0), 1.0)
            p_hi = 1.0 if k == m - 1 else min(max(lo + (hi - lo) * (k + 1) / m, 0.0), 1.0)
            margin = 1e-6 * (abs(a[k]) + abs(bk))
            ratio = ratio and (
                (p_lo > 0 and min(a[k] * p_lo + bk, a[k] * p_hi + bk) > margin) or (bk == 0 and a[k] > 0)
            )
        self.tau_identity = all(r[2] == 1.0 and r[3] == 0.0 for r in rows)
        self.tau_all_pos = all(r[4] < 0 for r in rows)
        self.tau_ratio = ratio and not self.tau_all_pos
        self.tau_no_pos = all(r[4] > 0 for r in rows)
        tab = _table([r[:2] for r in rows] if self.tau_all_pos else [r[2:4] for r in rows] if ratio else rows)
        knots = torch.tensor(_interior_knots(lo - 1, hi - 1, m), dtype=torch.float32) if m > 1 else None
        self.register_buffer("tau_knots", knots, persistent=False)
        self.register_buffer("tau_tab", None if self.tau_identity else tab, persistent=False)
        self._track_device()

    def log_tau(self, logp: Tensor, pm1: Tensor | None = None, need_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.tau_tab is None:
            return logp, None
        if pm1 is None:
            pm1 = torch.expm1(logp)
        if self.tau_all_pos:  # log tau = log(a p + b), exactly, in log space; d/dlog p = a p / tau
            log_a, log_b = _lookup(self.tau_tab, self.tau_knots, pm1)
            u = logp + log_a
            lt = torch.logaddexp(u, log_b)
            return lt, (torch.sub(u, lt).exp_() if need_grad else None)
        if self.tau_ratio:  # log tau = log p + log(a + b / p), tau > 0 on every piece; d/dlog p = a / r
            a, b = _lookup(self.tau_tab, self.tau_knots, pm1)
            r = torch.addcdiv(a, b, logp.exp().clamp_min_(1e-30))
            lt = r.log().add_(logp)
            return lt, (torch.div(a, r) if need_grad else None)
        log_a, log_b, a, b, floor = _lookup(self.tau_tab, self.tau_knots, pm1)
        tau = torch.addcmul(b, a, logp.exp())
        lt = torch.maximum(tau, floor).log_()
        if not self.tau_no_pos:
            # positive pieces: the log-space value (the direct one agrees to rounding, or is lower where p
            # underflows); other pieces have log a = log b = -inf there, so their direct value stays
            lt = torch.maximum(lt, torch.logaddexp(logp + log_a, log_b))
        if not need_grad:
            return lt, None
        # d log tau / d log p = a p / tau, and 0 where tau was clamped
        return lt, torch.sub(logp, lt).exp_().mul_(a).mul_(tau > floor)


class SearchSoftmaxLoss(_TargetLoss):
    """Search-Softmax: ``L = -log p_m = -log p + log(1 + a (p - 1))``, ``a = a[bin(p)] <= 0``.

    ``1 + a (p - 1) = 1 + |a| (1 - p) >= 1``, so the log is always safe; it is computed as
    ``log1p(a (p - 1))`` from ``p - 1 = expm1(log p)``. ``tab`` columns: a, 1 - a.
    """

    tab: Tensor | None
    knots: Tensor | None

    def __init__(self, program: dict[str, Any], head: str, scale: float, reduction: str = "mean") -> None:
        _mapping(program, "program", ("kind", "a"), ("kind", "a"))
        a = _numbers(program["a"], "program.a")
        for i, v in enumerate(a):
            if v > 0:
                raise ValueError(f"program.a[{i}]: must be <= 0 (search-softmax), got {v}")
        super().__init__(head, scale, reduction, None)
        k = len(a)
        self.identity = all(v == 0.0 for v in a)
        self.register_buffer("tab", None if self.identity else _table([[v, 1.0 - v] for v in a]), persistent=False)
        knots = torch.tensor(_interior_knots(-1.0, 0.0, k), dtype=torch.float32) if k > 1 else None
        self.register_buffer("knots", knots, persistent=False)
        self._track_device()

    def log_tau(self, logp: Tensor, pm1: Tensor | None = None, need_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        if self.tab is None:
            return logp, None
        if pm1 is None:
            pm1 = torch.expm1(logp)
        a, one_minus_a = _lookup(self.tab, self.knots, pm1)
        d = torch.mul(a, pm1)  # a (p - 1) >= 0
        lt = logp - torch.log1p(d)
        # d log p_m / d log p = 1 - a p / (1 + a (p - 1)) = (1 - a) / (1 + a (p - 1))
        return lt, (torch.div(one_minus_a, d.add_(1.0)) if need_grad else None)


class CosFaceLoss(_TargetLoss):
    """AM-Softmax / CosFace: cosine head ``l_y = s (cos_y - m)``; linear head ``l_y = z_y - m``; CE."""

    def __init__(self, head: str, scale: float, margin: float, reduction: str = "mean") -> None:
        super().__init__(head, scale, reduction, (-1.0, 1.0, [1.0], [-margin]))
        self.margin = margin
        self._track_device()

    def log_tau(self, logp: Tensor, pm1: Tensor | None = None, need_grad: bool = False) -> tuple[Tensor, Tensor | None]:
        return logp, None


# --- the other presets: plain autograd --------------------------------------------------------------


def _reduce(rows: Tensor, z: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return torch.add(rows.mean(), z.sum(), alpha=0.0)
    return torch.add(rows, z.sum(1), alpha=0.0)


class SoftmaxLoss(_LogitLoss):
    """Cross-entropy on ``s z`` with label smoothing eps:
    ``L = -(1 - eps) log p_y - eps/C sum_j log p_j`` (``F.cross_entropy``)."""

    def __init__(self, head: str, scale: float, label_smoothing: float, reduction: str = "mean") -> None:
        super().__init__()
        self.scale = float(scale) if head == "cosine" else 1.0
        self.label_smoothing, self.reduction = label_smoothing, reduction

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        _check_inputs(outputs, target)
        z = outputs.double() if outputs.dtype == torch.float64 else outputs.float()
        logits = self.shifted(z * self.scale)
        rows = F.cross_entropy(logits, target.long(), reduction="none", label_smoothing=self.label_smoothing)
        return _reduce(rows, z, self.reduction)


class ArcFaceLoss(_LogitLoss):
    """ArcFace (Deng et al., CVPR 2019), the insightface form (``easy_margin=False``)::

        phi = cos_y cos m - sin_y sin m              (= cos(theta_y + m)), sin_y = sqrt(1 - cos_y^2)
        phi = cos_y - m sin m     where cos_y <= cos(pi - m)   (theta_y + m would pass pi)
        L   = CE(s [cos with cos_y replaced by phi])

    ``1 - cos^2`` is clamped to [1e-12, 1] inside the square root so that the gradient stays finite at
    ``|cos| = 1`` (a change of at most 1e-6 sin m in phi).
    """

    def __init__(self, scale: float, margin: float, reduction: str = "mean") -> None:
        super().__init__()
        self.scale, self.margin, self.reduction = float(scale), margin, reduction
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th, self.mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        _check_inputs(outputs, target)
        z = outputs.double() if outputs.dtype == torch.float64 else outputs.float()
        y = target.long().view(-1, 1)
        cos = z.gather(1, y)
        sin = (1.0 - cos * cos).clamp(1e-12, 1.0).sqrt()
        phi = cos * self.cos_m - sin * self.sin_m
        phi = torch.where(cos > self.th, phi, cos - self.mm)
        logits = self.shifted((z * self.scale).scatter(1, y, phi * self.scale))
        rows = -torch.log_softmax(logits, 1).gather(1, y).squeeze(1)
        return _reduce(rows, z, self.reduction)


class FocalLoss(_LogitLoss):
    """Focal loss (Lin et al., ICCV 2017): ``L = -(1 - p_y)^gamma log p_y`` on ``s z``.

    ``1 - p = -expm1(log p)`` is clamped at 1e-30 so that the gradient stays finite at ``p = 1`` for
    ``gamma < 1`` (the loss there is 0 either way).
    """

    def __init__(self, head: str, scale: float, gamma: float, reduction: str = "mean") -> None:
        super().__init__()
        self.scale = float(scale) if head == "cosine" else 1.0
        self.gamma, self.reduction = gamma, reduction

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        _check_inputs(outputs, target)
        z = outputs.double() if outputs.dtype == torch.float64 else outputs.float()
        logp = torch.log_softmax(self.shifted(z * self.scale), 1).gather(1, target.long().view(-1, 1)).squeeze(1)
        weight = (-torch.expm1(logp)).clamp_min(1e-30).pow(self.gamma)
        return _reduce(-weight * logp, z, self.reduction)


class TargetProbabilityLoss(_LogitLoss):
    """``L = f(log p_y)`` on ``s z`` for the robust presets (all in terms of ``p = p_y``)::

    gce    (1 - p^q) / q                     = -expm1(q log p) / q
    mae    2 (1 - p)                         = -2 expm1(log p)
    sce    alpha (-log p) - beta A (1 - p)   A = ln(1e-4)
    poly1  -log p + epsilon (1 - p)
    """

    def __init__(self, name: str, head: str, scale: float, params: dict[str, float], reduction: str = "mean") -> None:
        super().__init__()
        self.name, self.params = name, params
        self.scale = float(scale) if head == "cosine" else 1.0
        self.reduction = reduction

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        _check_inputs(outputs, target)
        z = outputs.double() if outputs.dtype == torch.float64 else outputs.float()
        logp = torch.log_softmax(self.shifted(z * self.scale), 1).gather(1, target.long().view(-1, 1)).squeeze(1)
        one_minus_p = -torch.expm1(logp)
        k = self.params
        if self.name == "gce":
            rows = -torch.expm1(k["q"] * logp) / k["q"]
        elif self.name == "mae":
            rows = 2.0 * one_minus_p
        elif self.name == "sce":
            rows = -k["alpha"] * logp - k["beta"] * RCE_A * one_minus_p
        else:  # poly1
            rows = -logp + k["epsilon"] * one_minus_p
        return _reduce(rows, z, self.reduction)


def class_balanced_weights(counts: Sequence[int], beta: float) -> list[float]:
    """Cui et al.'s weights (1 - beta) / (1 - beta^n_c) by the effective number of samples, mean 1 over
    classes; a class without examples gets the largest weight (it never occurs in a batch anyway)."""
    raw = [(1.0 - beta) / (1.0 - beta**n) if n > 0 else math.nan for n in counts]
    top = max((w for w in raw if not math.isnan(w)), default=1.0)
    raw = [top if math.isnan(w) else w for w in raw]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


def logit_adjustment(counts: Sequence[int], a: float) -> list[float]:
    """The per-class shifts ``a log pi_c`` (``pi_c = n_c / sum n``), centred to mean 0 (softmax ignores a common
    shift). A class without training examples counts as one (its prior is finite and the smallest)."""
    logs = [math.log(max(n, 1)) for n in counts]
    mean = sum(logs) / len(logs)
    return [a * (v - mean) for v in logs]


class ClassBalanced(nn.Module):
    """Rows of an inner loss weighted by their class: ``mean_i w_{y_i} L_i`` (or the weighted rows)."""

    weight: Tensor

    def __init__(self, inner: nn.Module, weights: Sequence[float], reduction: str = "mean") -> None:
        super().__init__()
        self.inner, self.reduction = inner, reduction
        self.register_buffer("weight", torch.tensor(list(weights), dtype=torch.float32), persistent=False)

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        if self.weight.device != outputs.device:
            self.weight = self.weight.to(outputs.device)
        rows = self.inner(outputs, target)
        rows = rows * self.weight.to(rows.dtype)[target.long()]
        return rows.mean() if self.reduction == "mean" else rows


# --- entry point ---------------------------------------------------------------------------------

_PRESET_FIELDS = ("kind", "name", "margin", "gamma", "labelSmoothing", "q", "alpha", "beta", "epsilon")


def _preset(program: dict[str, Any], head: str, scale: float, reduction: str) -> nn.Module:
    _mapping(program, "program", _PRESET_FIELDS, ("kind", "name"))
    name = program["name"]
    if name not in PRESETS:
        raise ValueError(f"program.name: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    margin = _number(program.get("margin", 0.35), "program.margin")
    gamma = _number(program.get("gamma", 2.0), "program.gamma")
    eps = _number(program.get("labelSmoothing", 0.0), "program.labelSmoothing")
    if margin < 0:
        raise ValueError(f"program.margin: must be >= 0, got {margin}")
    if gamma < 0:
        raise ValueError(f"program.gamma: must be >= 0, got {gamma}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"program.labelSmoothing: must be in [0, 1), got {eps}")
    if name in ("softmax", "label-smoothing"):
        return SoftmaxLoss(head, scale, eps, reduction)
    if name in ("gce", "mae", "sce", "poly1"):
        defaults = {"gce": {"q": 0.7}, "mae": {}, "sce": {"alpha": 0.1, "beta": 1.0}, "poly1": {"epsilon": 1.0}}
        params = {k: _number(program.get(k, v), f"program.{k}") for k, v in defaults[name].items()}
        if name == "gce" and not 0.0 < params["q"] <= 1.0:
            raise ValueError(f"program.q: must be in (0, 1], got {params['q']}")
        if name == "sce" and min(params.values()) < 0:
            raise ValueError(f"program.alpha/beta: must be >= 0, got {params}")
        if name == "poly1" and params["epsilon"] < -1.0:
            raise ValueError(f"program.epsilon: must be >= -1 (the loss must decrease in p), got {params['epsilon']}")
        return TargetProbabilityLoss(name, head, scale, params, reduction)
    if name == "cosface":
        return CosFaceLoss(head, scale, margin, reduction)
    if name == "arcface":
        if head != "cosine":
            raise ValueError("program.name: the arcface preset needs head 'cosine'")
        return ArcFaceLoss(scale, margin, reduction)
    return FocalLoss(head, scale, gamma, reduction)


def build_loss(
    program: dict[str, Any],
    head: str,
    scale: float,
    *,
    reduction: str = "mean",
    class_counts: Sequence[int] | None = None,
) -> nn.Module:
    """The loss of a program: ``module(outputs, target)`` -> float32 (float64 for float64 outputs) loss.

    ``reduction="mean"`` (default) gives the batch mean, ``"none"`` the per-row losses. ``class_counts``
    (training examples per class) is needed by programs with ``classBalance`` or ``logitAdjust``.
    ValueError, naming the field, for an unknown kind or a malformed program.
    """
    if isinstance(program, dict) and "classBalance" in program:
        beta = _number(program["classBalance"], "program.classBalance")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"program.classBalance: must be in [0, 1), got {beta}")
        if class_counts is None:
            raise ValueError("program.classBalance: needs the training split's class counts (class_counts)")
        inner = build_loss(
            {k: v for k, v in program.items() if k != "classBalance"},
            head,
            scale,
            reduction="none",
            class_counts=class_counts,
        )
        return ClassBalanced(inner, class_balanced_weights(class_counts, beta), reduction)
    if isinstance(program, dict) and "logitAdjust" in program:
        a = _number(program["logitAdjust"], "program.logitAdjust")
        module = build_loss({k: v for k, v in program.items() if k != "logitAdjust"}, head, scale, reduction=reduction)
        if a == 0.0:
            return module
        if class_counts is None:
            raise ValueError("program.logitAdjust: needs the training split's class counts (class_counts)")
        if not isinstance(module, _LogitLoss):
            raise ValueError("program.logitAdjust: not supported by this loss")
        module.shift = torch.tensor(logit_adjustment(class_counts, a), dtype=torch.float64).view(1, -1)
        if isinstance(module, _TargetLoss):
            module._track_device()
        return module
    if isinstance(program, dict) and "poly" in program:
        eps = _number(program["poly"], "program.poly")
        if not -1.0 <= eps <= 10.0:
            raise ValueError(f"program.poly: must be in [-1, 10], got {eps}")
        module = build_loss({k: v for k, v in program.items() if k != "poly"}, head, scale, reduction=reduction)
        if not isinstance(module, _TargetLoss):
            raise ValueError("program.poly: only piecewise and search-softmax programs take it")
        module.poly = eps
        return module
    if head not in HEADS:
        raise ValueError(f"head: expected one of {', '.join(HEADS)}, got {head!r}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(program, dict):
        raise ValueError(f"program: expected a mapping, got {type(program).__name__}")
    kind = program.get("kind")
    if kind == "piecewise":
        return PiecewiseLoss(program, head, scale, reduction)
    if kind == "search-softmax":
        return SearchSoftmaxLoss(program, head, scale, reduction)
    if kind == "preset":
        return _preset(program, head, scale, reduction)
    raise ValueError(f"program.kind: unknown loss program kind {kind!r}; expected piecewise, search-softmax or preset")
