"""The I/O half of the core's contract, shared by every shell (the local runner and the operator): reading a
sample's result.json into an observation, and applying the storage actions. All of it is idempotent."""

from __future__ import annotations

from amlfs import core, storage
from amlfs.contract import CHECKPOINT, RESULT, STATUS_OK


def read_result(
    root: str, epoch: int, sample: int, attempt: int, theta: list[float] | None = None
) -> core.Observation | None:
    """The sample's result.json as an observation; None when it is missing, unreadable or half-visible, or
    (given theta) left over from another search in the same place."""
    uri = f"{core.Layout(root).sample_dir(epoch, sample)}/{RESULT}"
    try:
        r = storage.read_json(uri)
    except (storage.StorageError, ValueError):
        return None
    if theta is not None and r.get("theta") != theta:
        return None
    outcome: core.Outcome = "succeeded" if r.get("status") == STATUS_OK else "no-reward"
    return core.Observation(
        epoch,
        sample,
        outcome,
        attempt,
        reward=r.get("reward"),
        sha256=r.get("sha256", ""),
        message=r.get("message", ""),
        val_loss=_number(r.get("valLoss")),
    )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def apply_storage(action: core.Action) -> None:
    """Carry out a Promote (copies, server-side on S3), AppendHistory or WriteJson; other actions are no-ops."""
    if isinstance(action, core.Promote):
        for target in action.targets:
            for name in (CHECKPOINT, RESULT):
                storage.copy(f"{action.source}/{name}", f"{target}/{name}")
    elif isinstance(action, core.AppendHistory):
        storage.append_jsonl(action.uri, action.record)
    elif isinstance(action, core.WriteJson):
        storage.write_json(action.uri, action.data)
