"""Task kinds: one module per kind behind `base.Task` (load the data, evaluate into named metrics, the reward).

A new kind is one module with a `Task` subclass and one line in `REGISTRY` (and its name in spec.TaskKind).
"""

from __future__ import annotations

from amlfs_trainer.tasks.base import Task
from amlfs_trainer.tasks.classification import Classification
from amlfs_trainer.tasks.retrieval import Retrieval
from amlfs_trainer.tasks.verification import Verification

REGISTRY: dict[str, type[Task]] = {t.kind: t for t in (Classification, Retrieval, Verification)}


def get_task(kind: str) -> Task:
    if kind not in REGISTRY:
        raise ValueError(f"task.kind: unknown kind {kind!r}; use one of {', '.join(REGISTRY)}")
    return REGISTRY[kind]()
