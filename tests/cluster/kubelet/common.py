"""What every part of the process kubelet shares: its logger, the constants of the pod API it mimics, time and
quantity helpers, effective pod resource requests, and ConfigError (a container that cannot start yet)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

log = logging.getLogger("amlfs.kubelet")

SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
GPU_RESOURCE = "nvidia.com/gpu"
TERMINAL = ("Succeeded", "Failed")
MAX_TERMINATION_MESSAGE = 4096
#: where a container in its own mount namespace finds its termination-message
#: file (AMLFS_TERMINATION_LOG): a private tmpfs, so no volume can hide it
IN_POD_TERMINATION_LOG = "/run/amlfs-pod/termination-log"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str) -> float:
    return dt.datetime.strptime(s[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()


def parse_quantity(q: Any) -> float:
    from kubernetes.utils import parse_quantity as pq

    return float(pq(str(q)))


def _pod_requests(pod: dict) -> dict[str, float]:
    """Effective requests: max(sum of containers, any init container), per
    resource; limits stand in for missing requests (as the API defaults)."""

    def reqs(c: dict) -> dict[str, float]:
        r = c.get("resources") or {}
        merged = {**(r.get("limits") or {}), **(r.get("requests") or {})}
        return {k: parse_quantity(v) for k, v in merged.items()}

    total: dict[str, float] = {}
    for c in pod["spec"].get("containers", []):
        for k, v in reqs(c).items():
            total[k] = total.get(k, 0) + v
    for c in pod["spec"].get("initContainers", []) or []:
        for k, v in reqs(c).items():
            total[k] = max(total.get(k, 0), v)
    return total


class ConfigError(Exception):
    """A container cannot be started yet (missing secret, configmap, key)."""


class ImageNotFound(ConfigError):
    """An image the node cannot "pull": no command given and no entry in image_commands (the node's registry)."""
