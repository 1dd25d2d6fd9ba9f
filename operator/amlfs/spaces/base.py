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

    @classmethod
    def from_spec(cls, spec: LossSearchSpec) -> SpaceConfig:
        if spec.model.head == "cosine":
            return cls(spec.search.intervals, spec.search.parameterization, -1.0, 1.0, spec.model.scale)
        r = spec.search.logit_range
        return cls(spec.search.intervals, spec.search.parameterization, -r, r, 1.0)


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


def preset_program(init: InitSpec, label_smoothing: float = 0.0) -> Program:
    """The exact (not approximated) loss of a preset; used by selection-only mode and baselines."""
    return {
        "kind": "preset",
        "name": init.preset,
        "margin": init.margin,
        "gamma": init.gamma,
        "labelSmoothing": label_smoothing,
    }


# --- preset target functions, used for warm starts ------------------------------------------------


def preset_t(init: InitSpec, x: float) -> float:
    if init.preset == "cosface":
        return x - init.margin
    if init.preset == "arcface":
        return math.cos(math.acos(max(-1.0, min(1.0, x))) + init.margin)
    return x


def preset_tau(init: InitSpec, p: float) -> float:
    if init.preset == "focal":
        return 0.0 if p <= 0.0 else p ** ((1.0 - p) ** init.gamma)
    return p


# --- evaluation of programs (pure Python, for reports and tests) ---------------------------------


def piece_index(x: float, lo: float, hi: float, m: int) -> int:
    k = math.floor((x - lo) / (hi - lo) * m)
    return min(max(k, 0), m - 1)


def _piecewise(fn: dict[str, Any], x: float) -> float:
    k = piece_index(x, fn["lo"], fn["hi"], len(fn["a"]))
    return fn["a"][k] * x + fn["b"][k]


def evaluate(program: Program, which: str, x: float) -> float:
    """Evaluate `t` or `tau` of a program at x (what the trainer applies, without clamping)."""
    kind = program["kind"]
    if kind == "piecewise":
        return _piecewise(program[which], x)
    if kind == "search-softmax":
        if which == "t":
            return x
        a = program["a"]
        k = piece_index(x, 0.0, 1.0, len(a))
        return x / (a[k] * x + 1.0 - a[k])
    if kind == "preset":
        init = InitSpec(preset=program["name"], margin=program["margin"], gamma=program["gamma"])
        return preset_t(init, x) if which == "t" else preset_tau(init, x)
    raise ValueError(f"unknown loss program kind {kind!r}")
