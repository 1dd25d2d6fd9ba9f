"""Loss search spaces (pure Python). Each space maps a parameter vector theta to a *loss program*: a plain
dict the trainer evaluates with PyTorch. Adding a space is one file here plus one line in `REGISTRY`."""

from amlfs.spaces.amlfs_space import AmlfsSpace
from amlfs.spaces.base import Space, SpaceConfig, evaluate, piece_index, preset_program, with_class_balance
from amlfs.spaces.search_softmax import SearchSoftmaxSpace

REGISTRY: dict[str, Space] = {s.name: s for s in (AmlfsSpace(), SearchSoftmaxSpace())}


def get_space(name: str) -> Space:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; use one of {sorted(REGISTRY)}") from None


__all__ = [
    "REGISTRY",
    "Space",
    "SpaceConfig",
    "evaluate",
    "get_space",
    "piece_index",
    "preset_program",
    "with_class_balance",
]
