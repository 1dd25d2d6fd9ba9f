"""A search read back from its storage root alone (`amlfs report`, `amlfs export`), local or on S3.

Below a root the core keeps `history.jsonl` (one record per closed epoch), `spec.json` (the spec, rewritten with
every closed epoch), `final/mu.json` (once the search succeeded) and each sample's
`epoch-NNNN/sample-SS/result.json`. A root written before the core stored its spec, or a cluster search's before
its first epoch closed, has none: what needs the spec (μ's names and identity, the loss curves) is then left out.
A local `amlfs run` root also holds the runner's `spec.json` from its start and its `status.json`, whose phase is
the truth there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from amlfs import storage
from amlfs.contract import CHECKPOINT, RESULT, ConfigError
from amlfs.core import Layout, initial_mu
from amlfs.spec import LossSearchSpec, SpecError, as_begun, explain
from amlfs.status import Best, LossSearchStatus

CHECK_S3 = "check AWS_ENDPOINT_URL and the AWS credentials"
GIVE_ROOT = "give a search's storage root: runs/NAME, file:///..., or its status.storageRoot (s3://...)"


@dataclass
class Stored:
    """What a storage root holds of a search, and the status it implies."""

    root: str
    status: LossSearchStatus
    history: list[dict[str, Any]]
    spec: LossSearchSpec | None
    final: dict[str, Any] | None
    missing_spec: str  # why spec is None ("" when it is there)
    results: int  # result.json files of the epoch being trained (a running search)
    phase_from: Literal["status.json", "records"]  # records: Running only means "not finished"


def root_uri(root: str) -> str:
    """A canonical URI (file:// or s3://, no trailing slash) for a root given as a path or a URI."""
    if "://" not in root:
        root = str(Path(root).absolute())
    try:
        return storage.normalize(root).rstrip("/")
    except ValueError as exc:  # the message names the URI and the forms that work
        raise SpecError(str(exc)) from None


def read(uri: str) -> bytes | None:
    """An object's bytes; None when it does not exist. Other failures are one SpecError line with the fix."""
    try:
        return storage.read_bytes(uri)
    except storage.NotFound:
        return None
    except (storage.StorageError, ConfigError) as exc:
        fix = CHECK_S3 if uri.startswith("s3://") else "check the path and its permissions"
        raise SpecError(f"{uri}: cannot read ({_one_line(exc)}); {fix}") from None
    except ImportError:
        raise SpecError(f"{uri}: reading s3:// needs boto3; pip install boto3") from None


def read_json(uri: str) -> Any:
    """A JSON object, None when it does not exist."""
    data = read(uri)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise SpecError(f"{uri}: not valid JSON; the root is damaged or not a search's") from None


def read_history(root: str) -> list[dict[str, Any]]:
    """The closed epochs' records, in order ([] before the first epoch closed)."""
    uri = Layout(root).history
    data = read(uri) or b""
    try:
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    except ValueError:
        raise SpecError(f"{uri}: a line is not valid JSON; the root is damaged or not a search's") from None


def read_final(root: str) -> dict[str, Any] | None:
    """final/mu.json: the finished search's μ and loss; None while it has not finished."""
    return read_json(f"{Layout(root).final}/mu.json")


def parse_spec(doc: Any) -> tuple[LossSearchSpec | None, str]:
    """The stored spec (spec.json's document, None when there is none), or None and why not."""
    if doc is None:
        return None, "no spec.json under the root (a search begun before amlfs stored it there)"
    try:
        return LossSearchSpec.model_validate(as_begun(doc) if isinstance(doc, dict) else doc), ""
    except ValidationError as err:
        return None, f"its spec.json is not one this amlfs reads ({explain(err, 'spec')})"


def load(root: str) -> Stored:
    """Everything `amlfs report` shows of the search at `root`. SpecError when nothing of a search is there."""
    root = root_uri(root)
    history, final, spec_doc = read_history(root), read_final(root), read_json(Layout(root).spec)
    spec, why = parse_spec(spec_doc)
    local = _local_status(root)
    status = implied_status(root, history, spec, final, local)
    results = 0 if status.phase == "Succeeded" else _results(root, status.epoch)
    if not history and final is None and spec_doc is None and not results:
        raise SpecError(_nothing_here(root))
    return Stored(root, status, history, spec, final, why, results, "records" if local is None else "status.json")


def implied_status(
    root: str,
    history: list[dict[str, Any]],
    spec: LossSearchSpec | None,
    final: dict[str, Any] | None,
    local: LossSearchStatus | None = None,
) -> LossSearchStatus:
    """The status the stored records imply: the core's best (the first epoch with the highest reward), μ after
    the last closed epoch, and the phase (Succeeded once final/mu.json covers every closed epoch, else Running;
    a local run's status.json says better)."""
    lay, epoch = Layout(root), (history[-1]["epoch"] + 1 if history else 0)
    best: Best | None = None
    for r in history:
        if best is None or r["bestReward"] > best.reward:
            best = Best(
                epoch=r["epoch"],
                sample=r["best"],
                reward=r["bestReward"],
                checkpoint=f"{lay.best}/{CHECKPOINT}",
                sha256=r.get("sha256", ""),
            )
    done = final is not None and final.get("epochs") == epoch
    if final is not None and done:
        mu = list(final["mu"])
    elif history:
        mu = list(history[-1]["muAfter"])
    else:
        mu = initial_mu(spec) if spec is not None else []
    metric = history[-1].get("rewardMetric", "") if history else ""
    return LossSearchStatus(
        phase=local.phase if local is not None else "Succeeded" if done else "Running",
        epoch=epoch,
        mu=mu,
        sigma=history[-1].get("sigma", 0.0) if history else spec.search.sigma if spec else 0.0,
        reward_metric=metric or (spec.reward_metric if spec is not None else ""),
        best=best,
        storage_root=root,
        message=local.message if local is not None else "",
    )


def _local_status(root: str) -> LossSearchStatus | None:
    """The status.json a local `amlfs run` keeps in its root, if this is such a root."""
    if not root.startswith("file://"):
        return None
    data = read(f"{root}/status.json")
    try:
        return LossSearchStatus.model_validate_json(data) if data is not None else None
    except ValueError:
        return None  # half a status is no phase: the records alone decide


def _results(root: str, epoch: int) -> int:
    """How many samples of the epoch being trained have written their result.json."""
    prefix = Layout(root).epoch_dir(epoch)
    try:
        return sum(1 for uri in storage.list_prefix(prefix) if uri.endswith(f"/{RESULT}") and "/sample-" in uri)
    except (storage.StorageError, ConfigError) as exc:
        raise SpecError(f"{prefix}: cannot list ({_one_line(exc)}); {CHECK_S3}") from None


def _nothing_here(root: str) -> str:
    """No search at root: say so, naming the roots below it (a cluster search's root is <uri>/<ns>/<name>/<uid>)."""
    loc = storage.parse(root)
    if loc.scheme == "file" and not Path(loc.key).is_dir():
        return f"{root}: no such directory; {GIVE_ROOT}"
    try:
        below = sorted({u.rsplit("/", 1)[0] for u in storage.list_prefix(root) if u.endswith("/history.jsonl")})
    except (storage.StorageError, ConfigError):
        below = []
    if below:
        return f"{root}: no search directly here, but below it: {', '.join(below[:3])}; give one of those"
    return f"{root}: no search here (no history.jsonl, spec.json, final/mu.json or result of epoch 0); {GIVE_ROOT}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
