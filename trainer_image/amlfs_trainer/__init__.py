"""The amlfs trainer: the PyTorch side of a loss search. For one's own training loop: `exported_loss`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["exported_loss"]


def exported_loss(
    source: str | Path | dict[str, Any], *, reduction: str = "mean", class_counts: Sequence[int] | None = None
) -> Any:
    """The loss a search found (a file written by `amlfs export`, or its parsed JSON) as an ``nn.Module``:
    ``criterion(outputs, target)``, outputs being logits (a linear head) or cosines (a cosine head, the loss
    applying its scale). ``class_counts`` (training examples per class) is needed by a class-balanced or
    logit-adjusted loss."""
    from amlfs.export import FORMAT
    from amlfs_trainer.losses import build_loss

    doc = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"format: expected {FORMAT!r} (a file from `amlfs export`), got {doc.get('format')!r}")
    return build_loss(doc["program"], doc["head"], doc["scale"], reduction=reduction, class_counts=class_counts)
