"""Search-Softmax (Wang et al., "Loss Function Search for Face Recognition", ICML 2020).

p_m = p / (a p + 1 - a) with a <= 0, L = -log p_m. theta holds a for each of M equal bins of p (M = 1: one
global a). Sampled values above 0 are clipped to 0 (plain softmax). Identity: theta = 0.
"""

from __future__ import annotations

from amlfs.spaces.base import Program, Space, SpaceConfig
from amlfs.spec import InitSpec


class SearchSoftmaxSpace(Space):
    name = "search-softmax"

    def dim(self, cfg: SpaceConfig) -> int:
        return cfg.intervals

    def identity(self, cfg: SpaceConfig) -> list[float]:
        return [0.0] * cfg.intervals

    def names(self, cfg: SpaceConfig) -> list[str]:
        return [f"a_{k}" for k in range(cfg.intervals)]

    def from_preset(self, init: InitSpec, cfg: SpaceConfig) -> list[float]:
        if init.preset != "softmax":
            raise ValueError(f"preset {init.preset!r} is not representable in search-softmax; use softmax")
        return self.identity(cfg)

    def program(self, theta: list[float], cfg: SpaceConfig) -> Program:
        if len(theta) != self.dim(cfg):
            raise ValueError(
                f"theta has {len(theta)} numbers, search-softmax with M={cfg.intervals} needs {self.dim(cfg)}"
            )
        return {"kind": "search-softmax", "a": [min(float(v), 0.0) for v in theta]}
