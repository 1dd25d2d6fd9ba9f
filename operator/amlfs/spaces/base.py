"""The space interface and the loss-program evaluator shared by the report and the tests."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from amlfs.spec import InitSpec, LossSearchSpec

Program = dict[str, Any]


@dataclass(frozen=True)
class SpaceConfig:
    """What a space needs to know about the search: M, the parameterisation and the domain of t."""

    intervals: int
    parameterization: str = "monotone"
    t_lo: float = -1.0
    t_hi: float = 1.0
    logit_scale: float = 1.0  # logits per unit of t's input: the cosine head's scale s, 1 for linear heads
    prior_adjustment: bool = False  # bounded: one more coordinate, the strength of the logit adjustment
    poly: float = 0.0  # bounded: epsilon of the fixed Poly-1 term on every sampled loss (search.polyTerm)

    @classmethod
    def from_spec(cls, spec: LossSearchSpec) -> SpaceConfig:
        s = spec.search
        prior = s.bounded and s.prior_adjustment
        poly = (s.init.poly_epsilon if s.init.preset == "poly1" else s.poly_term) if s.bounded else 0.0
        if spec.model.head == "cosine":
            return cls(s.intervals, s.parameterization, -1.0, 1.0, spec.model.scale, prior, poly)
        return cls(s.intervals, s.parameterization, -s.logit_range, s.logit_range, 1.0, prior, poly)


class Space(ABC):
    """A family of losses indexed by a real vector theta; the identity theta is plain cross-entropy."""

    name: str

    @abstractmethod
    def dim(self, cfg: SpaceConfig) -> int: ...

    @abstractmethod
    def identity(self, cfg: SpaceConfig) -> list[float]: ...

    @abstractmethod
    def from_preset(self, init: InitSpec, cfg: SpaceConfig) -> list[float]:
        """theta approximating a named preset loss (a warm start). ValueError if not representable."""

    @abstractmethod
    def program(self, theta: list[float], cfg: SpaceConfig) -> Program:
        """The loss program for the trainer (JSON-serialisable)."""

    def names(self, cfg: SpaceConfig) -> list[str]:
        """Human-readable coordinate names (status, dashboards)."""
        return [f"theta[{i}]" for i in range(self.dim(cfg))]


RCE_A = math.log(1e-4)
"""Reverse cross-entropy's log of a zero label, clipped at 1e-4 as in the SCE reference: RCE = -A (1 - p)."""


def preset_program(init: InitSpec, label_smoothing: float = 0.0) -> Program:
    """The exact (not approximated) loss of a preset; used by selection-only mode and baselines.

    `label_smoothing` applies to the softmax preset (spec.optimizer.labelSmoothing); the label-smoothing
    preset carries init.smoothing.
    """
    program: Program = {
        "kind": "preset",
        "name": init.preset,
        "margin": init.margin,
        "gamma": init.gamma,
        "labelSmoothing": init.smoothing if init.preset == "label-smoothing" else label_smoothing,
    }
    if init.preset == "gce":
        program["q"] = init.q
    elif init.preset == "sce":
        program |= {"alpha": init.alpha, "beta": init.beta}
    elif init.preset == "poly1":
        program["epsilon"] = init.poly_epsilon
    return with_class_balance(program, init)


def with_class_balance(program: Program, init: InitSpec) -> Program:
    """The program with the init's class-balanced weighting and its fixed logit adjustment attached (any kind of
    program). A program that carries its own (searched) logitAdjust keeps it."""
    if init.class_balance > 0:
        program = program | {"classBalance": init.class_balance}
    if init.logit_adjustment > 0 and "logitAdjust" not in program:
        program = program | {"logitAdjust": init.logit_adjustment}
    return program


# --- preset target functions, used for warm starts ------------------------------------------------


def preset_t(init: InitSpec, x: float) -> float:
    if init.preset == "cosface":
        return x - init.margin
    if init.preset == "arcface":
        return math.cos(math.acos(max(-1.0, min(1.0, x))) + init.margin)
    return x


def preset_tau(init: InitSpec, p: float) -> float:
    """tau of the preset, normalised to tau(1) = 1 (L = -log tau(p)). label-smoothing is not of this form
    (it depends on every class's probability); its target part p is returned."""
    if init.preset == "focal":
        return 0.0 if p <= 0.0 else p ** ((1.0 - p) ** init.gamma)
    if init.preset == "gce":
        return math.exp(-(1.0 - p**init.q) / init.q)
    if init.preset == "mae":
        return math.exp(-2.0 * (1.0 - p))
    if init.preset == "sce":
        return p**init.alpha * math.exp(init.beta * RCE_A * (1.0 - p))
    if init.preset == "poly1":
        return p * math.exp(-init.poly_epsilon * (1.0 - p))
    return p


# --- evaluation of programs (pure Python, for reports and tests) ---------------------------------


def piece_index(x: float, lo: float, hi: float, m: int) -> int:
    k = math.floor((x - lo) / (hi - lo) * m)
    return min(max(k, 0), m - 1)


def _piecewise(fn: dict[str, Any], x: float) -> float:
    k = piece_index(x, fn["lo"], fn["hi"], len(fn["a"]))
    return fn["a"][k] * x + fn["b"][k]


def evaluate(program: Program, which: str, x: float) -> float:
    """Evaluate `t` or `tau` of a program at x (what the trainer applies, without clamping). A program's ``poly``
    term is part of tau here: -log tau(p) + eps (1 - p) = -log(tau(p) exp(-eps (1 - p)))."""
    kind = program["kind"]
    if which == "tau" and program.get("poly") and kind in ("piecewise", "search-softmax"):
        rest = {k: v for k, v in program.items() if k != "poly"}
        return evaluate(rest, which, x) * math.exp(-float(program["poly"]) * (1.0 - x))
    if kind == "piecewise":
        return _piecewise(program[which], x)
    if kind == "search-softmax":
        if which == "t":
            return x
        a = program["a"]
        k = piece_index(x, 0.0, 1.0, len(a))
        return x / (a[k] * x + 1.0 - a[k])
    if kind == "preset":
        init = InitSpec(
            preset=program["name"],
            margin=program["margin"],
            gamma=program["gamma"],
            q=program.get("q", 0.7),
            alpha=program.get("alpha", 0.1),
            beta=program.get("beta", 1.0),
            poly_epsilon=program.get("epsilon", 1.0),
        )
        return preset_t(init, x) if which == "t" else preset_tau(init, x)
    raise ValueError(f"unknown loss program kind {kind!r}")
