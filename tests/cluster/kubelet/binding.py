"""Binding unscheduled pods to this node (``bind_pods=True``, only when no kube-scheduler runs), after a simple
resource-fit check against the node's capacity, so tests of the control plane alone still get pods running."""

from __future__ import annotations

import time

from .common import TERMINAL, _pod_requests, log, parse_quantity
from .rest import ApiError, Rest


class BindingMixin:
    """The scheduler's job, reduced to one node and a fit check."""

    # set by ProcessKubelet.__init__
    rest: Rest
    node_name: str
    capacity: dict[str, str]
    _bind_attempts: dict[str, float]

    def _maybe_bind(self, pod: dict, pods: dict[str, dict]) -> None:
        uid = pod["metadata"]["uid"]
        if pod["spec"].get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        if time.monotonic() < self._bind_attempts.get(uid, 0):
            return
        self._bind_attempts[uid] = time.monotonic() + 1.0
        used: dict[str, float] = {}
        count = 0
        for p in pods.values():
            if p["spec"].get("nodeName") == self.node_name and p["status"].get("phase") not in TERMINAL:
                count += 1
                for k, v in _pod_requests(p).items():
                    used[k] = used.get(k, 0) + v
        req = _pod_requests(pod)
        short = [k for k, v in req.items() if used.get(k, 0) + v > parse_quantity(self.capacity.get(k, "0"))]
        if count + 1 > int(self.capacity["pods"]):
            short.append("pods")
        if short:
            return  # stays Pending; retried every second like a scheduler would
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.rest.request("POST", f"/api/v1/namespaces/{ns}/pods/{name}/binding", body=binding)
        except ApiError as e:
            log.info("binding %s/%s failed: %s", ns, name, e)
