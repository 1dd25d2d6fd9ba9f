"""Rewards through Prometheus metrics.

Each trainer pushes `amlfs_sample_reward`, `amlfs_sample_diverged` and `amlfs_sample_checkpoint_info{sha256}`
to the Pushgateway, grouped by (job, namespace, search, epoch, sample). The operator reads them from the
Pushgateway's own HTTP API (`GET /api/v1/metrics`): a reward is visible the moment it is pushed, whereas a
Prometheus query would add up to one scrape interval (15 s by default) to every epoch. Prometheus still scrapes
the Pushgateway for dashboards. When a sample's metrics are missing (pushgateway down, push failed), the
operator falls back to the sample's result.json in storage after a timeout and posts a Warning event.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from amlfs.contract import PUSH_JOB, grouping_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushedResult:
    reward: float | None
    diverged: bool
    sha256: str


class PushgatewayReader:
    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def results(self, namespace: str, search: str) -> dict[tuple[int, int], PushedResult]:
        """Every pushed sample result of one search, keyed by (epoch, sample). Empty when unreachable."""
        if not self.url:
            return {}
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/metrics", timeout=self.timeout) as resp:
                groups = json.load(resp).get("data", [])
        except (OSError, ValueError) as exc:
            log.warning("pushgateway %s unreachable: %s", self.url, exc)
            return {}
        out: dict[tuple[int, int], PushedResult] = {}
        for g in groups:
            lab = g.get("labels", {})
            if lab.get("job") != PUSH_JOB or lab.get("namespace") != namespace or lab.get("search") != search:
                continue
            try:
                key = (int(lab["epoch"]), int(lab["sample"]))
            except (KeyError, ValueError):
                continue
            reward = _value(g, "amlfs_sample_reward")
            diverged = _value(g, "amlfs_sample_diverged")
            info = g.get("amlfs_sample_checkpoint_info", {}).get("metrics", [])
            sha = info[0].get("labels", {}).get("sha256", "") if info else ""
            if reward is None and diverged is None:
                continue
            out[key] = PushedResult(reward=reward, diverged=bool(diverged), sha256=sha)
        return out

    def delete(self, namespace: str, search: str, epoch: int, sample: int) -> None:
        labels = {"job": PUSH_JOB} | grouping_key(namespace, search, epoch, sample)
        path = "/".join(f"{k}/{urllib.parse.quote(v, safe='')}" for k, v in labels.items())
        req = urllib.request.Request(f"{self.url}/metrics/{path}", method="DELETE")
        try:
            urllib.request.urlopen(req, timeout=self.timeout).close()
        except (OSError, urllib.error.HTTPError) as exc:
            log.warning("could not delete pushgateway group %s: %s", path, exc)


def _value(group: dict, name: str) -> float | None:
    metrics = group.get(name, {}).get("metrics", [])
    if not metrics:
        return None
    try:
        return float(metrics[0]["value"])
    except (KeyError, ValueError):
        return None
