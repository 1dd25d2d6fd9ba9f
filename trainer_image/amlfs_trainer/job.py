"""One invocation, validated: the spec parsed, every member's theta checked against the search space and turned
into its loss program, the URIs parsed. No torch, so bad input fails before the expensive imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amlfs import storage
from amlfs.contract import ConfigError, Invocation

if TYPE_CHECKING:
    from amlfs.spec import LossSearchSpec
    from amlfs_trainer.metrics import TrainerMetrics


class UsageError(ConfigError):
    """A malformed invocation (flags or environment)."""


@dataclass
class MemberJob:
    sample: int
    theta: list[float]
    program: dict[str, Any]
    output: str
    attempt: int = 0


@dataclass
class PackJob:
    """k >= 1 members of one epoch, trained from the same start checkpoint."""

    spec: LossSearchSpec
    search: str
    epoch: int
    members: list[MemberJob]
    start: str = ""
    start_sha256: str = ""
    namespace: str = "default"
    device: str = "auto"
    pack_mode: str = "auto"
    threads: int = 0
    cudnn_benchmark: bool = False
    metrics_port: int = 0
    pushgateway: str = ""
    cache_dir: Path | None = None
    metrics: TrainerMetrics | None = None
    timings: dict[str, float] = field(default_factory=dict)  # the invocation's start-up phases, paid once

    @property
    def samples(self) -> list[int]:
        return [m.sample for m in self.members]


def _load_spec_text(value: str) -> str:
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"--spec: cannot read {value[1:]} ({exc.strerror})") from None
    return value


def build_job(inv: Invocation) -> PackJob:
    """The validated job of an invocation; UsageError (one line, exit 2) for anything malformed."""
    from amlfs.core import program_for
    from amlfs.spaces import SpaceConfig, get_space
    from amlfs.spec import SpecError, spec_from_json

    try:
        spec = spec_from_json(_load_spec_text(inv.spec), "--spec")
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    if inv.epoch >= spec.search.epochs:
        raise UsageError(
            f"--epoch {inv.epoch}: the search has {spec.search.epochs} epochs (0-based index); "
            "raise spec.search.epochs or pass a smaller epoch"
        )
    if inv.epoch > 0 and not inv.start:
        raise UsageError(f"--start: epoch {inv.epoch} needs the previous epoch's best checkpoint")
    try:
        outputs = [storage.normalize(m.output) for m in inv.members]
        if inv.start:
            storage.parse(inv.start)
    except ValueError as exc:
        raise UsageError(f"--output/--start: {exc}") from None
    cfg = SpaceConfig.from_spec(spec)
    space = get_space(spec.search.space)
    members = []
    for m, output in zip(inv.members, outputs, strict=True):
        theta = list(m.theta) if m.theta else space.identity(cfg)
        if len(theta) != space.dim(cfg):
            where = "--theta" if len(inv.members) == 1 else f"--members (sample {m.sample}) theta"
            raise UsageError(
                f"{where}: {len(theta)} numbers, the {space.name}/{cfg.parameterization} space with "
                f"M={cfg.intervals} needs {space.dim(cfg)}"
            )
        members.append(MemberJob(m.sample, theta, program_for(spec, theta), output, inv.member_attempt(m)))
    return PackJob(
        spec=spec,
        search=inv.search,
        epoch=inv.epoch,
        members=members,
        start=storage.normalize(inv.start) if inv.start else "",
        start_sha256=inv.start_sha256,
        namespace=inv.namespace,
        device=inv.device,
        pack_mode=inv.pack_mode,
        threads=inv.threads,
        cudnn_benchmark=inv.cudnn_benchmark,
        metrics_port=inv.metrics_port,
        pushgateway=inv.pushgateway,
        cache_dir=Path(inv.cache_dir) if inv.cache_dir else None,
    )
