"""The `LossSearch` status: everything a controller needs to resume, bounded in size (etcd objects max 1.5 MB).

The local runner writes exactly this shape to `<workdir>/<name>/status.json`; the operator keeps it in the
resource's status subresource. Full per-epoch history (every theta and reward) goes to storage as JSON lines.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

HISTORY_LIMIT = 20

SampleState = Literal["Pending", "Running", "Succeeded", "NoReward", "Failed", "ConfigError"]
TERMINAL_SAMPLE_STATES = ("Succeeded", "NoReward", "Failed", "ConfigError")
Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]


class Model(BaseModel):
    """Status objects are mutable (the core edits a deep copy); camelCase on the wire like the spec."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Checkpoint(Model):
    uri: str = Field(description="URI of checkpoint.pt.")
    sha256: str = Field("", description="sha256 of checkpoint.pt, verified by every reader.")


class SampleStatus(Model):
    index: int
    theta: list[float]
    state: SampleState = "Pending"
    attempt: int = Field(0, description="Current attempt (0-based); failed attempts count against maxRetries.")
    restarts: int = Field(0, description="Restarts not counted as failures (preemption, lost pod/process).")
    pack: int | None = Field(
        None,
        description="Pack of the epoch whose pod trains this sample (trainer.samplesPerPod > 1 when the epoch "
        "began); none: a pod of its own.",
    )
    reward: float | None = None
    val_loss: float | None = Field(
        None, description="Its validation loss once it succeeded (a blown-up model: far above its siblings')."
    )
    checkpoint: str = Field("", description="URI of this sample's checkpoint.pt once it succeeded.")
    sha256: str = ""
    message: str = ""


class Best(Model):
    epoch: int
    sample: int
    reward: float
    checkpoint: str
    sha256: str = ""


class AdamState(Model):
    step: int = 0
    m: list[float] = Field(default_factory=list)
    v: list[float] = Field(default_factory=list)


class EpochRecord(Model):
    epoch: int
    rewards: list[float | None]
    best: int
    best_reward: float
    mean_reward: float
    mu_step: float = Field(description="L2 norm of the change of mu made after this epoch.")


class Condition(Model):
    """A metav1.Condition: one aspect of the resource's state (Ready, Progressing, Degraded)."""

    type: str = Field(max_length=316, description="Condition type in CamelCase, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    observed_generation: int = Field(0, ge=0, description="metadata.generation the condition was set from.")
    last_transition_time: str = Field(
        description="When status last changed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )
    reason: str = Field("", max_length=1024, description="Programmatic CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details.")


class LossSearchStatus(Model):
    phase: Phase = "Pending"
    epoch: int = Field(0, description="Index of the epoch being run; equals the number of completed epochs.")
    reward_metric: str = Field(
        "", description="The validation metric every reward is (spec.search.reward or spec.task.reward), e.g. mAP."
    )
    mu: list[float] = Field(default_factory=list)
    sigma: float = 0.0
    poly_term: float | None = Field(
        None,
        description="spec.search.polyTerm as this search began with it: a CRD that later adds or re-defaults the "
        "field leaves the loss of a running search as it was (absent: begun before the field, 0).",
    )
    adam: AdamState = Field(default_factory=AdamState)
    start: Checkpoint | None = Field(
        None, description="Checkpoint every sample of this epoch starts from (none: initialise from the seed)."
    )
    samples: list[SampleStatus] = Field(default_factory=list)
    best: Best | None = None
    history: list[EpochRecord] = Field(default_factory=list, description=f"Last {HISTORY_LIMIT} epochs.")
    reason: str = ""
    message: str = ""
    storage_root: str = Field(
        "",
        description="Where this search's checkpoints, results and history live. The operator puts a new "
        "search under <storage.uri>/<namespace>/<name>/<uid>, so a deleted and re-created search starts fresh "
        "and the old one's objects stay where they were (empty: <storage.uri>/<namespace>/<name>, a search begun "
        "before roots carried the UID).",
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing and Degraded.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int = Field(0, ge=0, description="metadata.generation the status was computed from.")

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)


# A sample's moves that no decision made: its trainer started, or ended with its result.
_PROGRESS = {(a, b) for a in ("Pending", "Running") for b in ("Running", "Succeeded", "NoReward") if a != b}


def only_progress(old: LossSearchStatus, new: LossSearchStatus) -> bool:
    """Whether `new` differs from `old` only in samples that moved on by themselves (a trainer started, or ended
    with its result while others still train): nothing decided (the same epoch, phase, distribution, attempts,
    messages and conditions), so nothing a resume needs (the results are in storage and on the Pushgateway)."""
    rest = {"samples", "conditions", "observed_generation"}
    if len(old.samples) != len(new.samples) or old.model_dump(exclude=rest) != new.model_dump(exclude=rest):
        return False
    same = {"index", "theta", "attempt", "restarts", "pack", "message"}
    moved = False
    for a, b in zip(old.samples, new.samples, strict=True):
        if a.state == b.state:
            if a != b:
                return False
        elif (a.state, b.state) not in _PROGRESS or a.model_dump(include=same) != b.model_dump(include=same):
            return False
        else:
            moved = True
    return moved
