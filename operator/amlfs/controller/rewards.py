"""Rewards through Prometheus metrics.

Each trainer pushes `amlfs_sample_reward`, `amlfs_sample_diverged`, `amlfs_sample_checkpoint_info{sha256}`,
`amlfs_sample_val_loss` (for the core's blow-up check) and `amlfs_sample_output_info{output}` (the prefix it wrote
its checkpoint and result.json under, which names the search's UID and the sample) to the Pushgateway, grouped by
(job, namespace, search, epoch, sample); the Pushgateway adds `push_time_seconds` to each group. The operator
reads them from the Pushgateway itself: a reward is visible the moment it is pushed, whereas a Prometheus query
would add up to one scrape interval (15 s by default) to every epoch. Prometheus still scrapes the Pushgateway for
dashboards. When a sample's metrics are missing (pushgateway down, push failed), the operator falls back to the
sample's result.json in storage after a timeout and posts a Warning event.

The Pushgateway has no per-group read: every read returns all groups of all searches. So one reader is shared by
all searches, and a read is shared by every pass that asks while it runs: a pass asks for a snapshot taken after
it saw its pods (`not_before`), which is then guaranteed to hold every reward pushed by a trainer that had exited
by then; passes asking at the same time wait for the same fetch. The snapshot is read from the text exposition
(`/metrics`), keeping only the lines of the metrics above: at 200 live groups that costs the Pushgateway
less than half of what `/api/v1/metrics` (JSON) does, and the operator about 60 %.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import delete_from_gateway

from amlfs.contract import PUSH_JOB, grouping_key
from amlfs.controller.metrics import PUSHGATEWAY_READ_SECONDS

log = logging.getLogger(__name__)

METRICS = (
    "amlfs_sample_reward",
    "amlfs_sample_diverged",
    "amlfs_sample_checkpoint_info",
    "amlfs_sample_val_loss",
    "amlfs_sample_output_info",
)
_PREFIXES = tuple(f"{m}{{" for m in (*METRICS, "push_time_seconds"))
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Key = tuple[int, int]  # (epoch, sample)


@dataclass(frozen=True)
class PushedResult:
    reward: float | None
    diverged: bool
    sha256: str
    val_loss: float | None = None
    output: str = ""  # the output prefix the trainer wrote to; "" from trainers that do not say
    pushed_at: float | None = None  # when it was pushed (Unix time, the Pushgateway's push_time_seconds)

    def wrote(self, output: str) -> bool:
        """Whether this result was written to `output` by the trainer itself (so it is complete in storage)."""
        return bool(self.output) and self.output.rstrip("/") == output.rstrip("/")


@dataclass
class Snapshot:
    """Every pushed sample result, by (namespace, search), as of one fetch that started at `started`."""

    started: float
    ok: bool
    searches: dict[tuple[str, str], dict[Key, PushedResult]] = field(default_factory=dict)


class PushgatewayReader:
    """The operator's one reader of the Pushgateway; thread-safe (passes run in worker threads)."""

    def __init__(self, url: str, timeout: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.clock = clock
        self.fetches = 0
        self._cond = threading.Condition()
        self._snapshot: Snapshot | None = None
        self._fetching: float | None = None  # start time of the fetch in flight
        self._memo: dict[str, Line] = {}  # the lines of the last fetch, parsed (only the fetch in flight uses it)

    def results(self, namespace: str, search: str, not_before: float | None = None) -> dict[Key, PushedResult]:
        """The search's pushed results, keyed by (epoch, sample), from a fetch that started at or after
        `not_before` (default: now). Empty when the Pushgateway is unreachable."""
        if not self.url:
            return {}
        snap = self.snapshot(self.clock() if not_before is None else not_before)
        return dict(snap.searches.get((namespace, search), {}))

    def cached(self, namespace: str, search: str) -> dict[Key, PushedResult]:
        """The search's results in the latest snapshot, however old (empty when there is none); never fetches."""
        with self._cond:
            snap = self._snapshot
            return dict(snap.searches.get((namespace, search), {})) if snap is not None else {}

    def snapshot(self, not_before: float) -> Snapshot:
        with self._cond:
            while True:
                snap = self._snapshot
                if snap is not None and snap.started >= not_before:
                    return snap
                if self._fetching is None:
                    started = self._fetching = self.clock()
                    break
                self._cond.wait()  # a fetch is in flight: use it if it started late enough, else the next one
        snap = Snapshot(started, False)
        try:
            snap = Snapshot(started, True, self._fetch())
            PUSHGATEWAY_READ_SECONDS.observe(self.clock() - started)
        except (OSError, ValueError) as exc:
            log.warning("pushgateway %s unreachable: %s", self.url, exc)
        finally:
            with self._cond:
                self.fetches += 1
                if self._snapshot is None or self._snapshot.started <= started:
                    self._snapshot = snap
                self._fetching = None
                self._cond.notify_all()
        return snap

    def _fetch(self) -> dict[tuple[str, str], dict[Key, PushedResult]]:
        req = urllib.request.Request(f"{self.url}/metrics", headers={"Accept": "text/plain; version=0.0.4"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
        return parse(text, self._memo)

    def delete(self, namespace: str, search: str, epoch: int, sample: int) -> None:
        """Delete one sample's group (deleting a group that is not there succeeds too)."""
        if not self.url:
            return
        key = grouping_key(namespace, search, epoch, sample)
        try:
            delete_from_gateway(self.url, job=PUSH_JOB, grouping_key=key, timeout=self.timeout)
        except (OSError, urllib.error.HTTPError) as exc:
            log.warning("could not delete pushgateway group %s: %s", key, exc)
            return
        with self._cond:
            if self._snapshot is not None:
                self._snapshot.searches.get((namespace, search), {}).pop((epoch, sample), None)


Line = tuple[tuple[str, str, int, int], str, object] | None  # a parsed line: (group, field, value), or not ours


def parse(text: str, memo: dict[str, Line] | None = None) -> dict[tuple[str, str], dict[Key, PushedResult]]:
    """The trainers' results in a text exposition, by (namespace, search) and (epoch, sample). `memo` holds the
    lines of the previous parse, replaced by this one's: a group's lines stay the same from one read to the next,
    so a reader polling hundreds of groups parses only the new ones."""
    raw: dict[tuple[str, str, int, int], dict[str, object]] = {}
    seen: dict[str, Line] = {}
    for line in text.splitlines():
        if not line.startswith(_PREFIXES):
            continue
        item = memo[line] if memo is not None and line in memo else _parse_line(line)
        seen[line] = item
        if item is not None:
            key, name, value = item
            raw.setdefault(key, {})[name] = value
    if memo is not None:
        memo.clear()
        memo.update(seen)
    out: dict[tuple[str, str], dict[Key, PushedResult]] = {}
    for (namespace, search, epoch, sample), got in raw.items():
        reward, diverged = got.get("amlfs_sample_reward"), got.get("amlfs_sample_diverged")
        if reward is None and diverged is None:
            continue
        out.setdefault((namespace, search), {})[(epoch, sample)] = PushedResult(
            reward=reward if isinstance(reward, float) else None,
            diverged=bool(diverged),
            sha256=str(got.get("sha256", "")),
            val_loss=val_loss if isinstance(val_loss := got.get("amlfs_sample_val_loss"), float) else None,
            output=str(got.get("output", "")),
            pushed_at=pushed if isinstance(pushed := got.get("push_time_seconds"), float) and pushed > 0 else None,
        )
    return out


def _parse_line(line: str) -> Line:
    name, _, rest = line.partition("{")
    labels_part, _, value_part = rest.rpartition("}")
    labels = {k: _unescape(v) for k, v in _LABEL.findall(labels_part)}
    if labels.get("job") != PUSH_JOB:
        return None
    try:
        key = (labels["namespace"], labels["search"], int(labels["epoch"]), int(labels["sample"]))
        value = float(value_part.split()[0])
    except (KeyError, ValueError, IndexError):
        return None
    if name == "amlfs_sample_checkpoint_info":
        return key, "sha256", labels.get("sha256", "")
    if name == "amlfs_sample_output_info":
        return key, "output", labels.get("output", "")
    return key, name, value


def _unescape(value: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], value) if "\\" in value else value
