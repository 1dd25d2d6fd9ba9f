"""The Node object and its heartbeats: registration with capacity, labels and conditions, the status patch, and the
Lease in kube-node-lease the node lifecycle controller watches (without a fresh Lease it marks the node not Ready)."""

from __future__ import annotations

import platform
import threading
import time
import uuid

from .common import log, now_micro, now_rfc3339
from .rest import ApiError, Rest


class NodeMixin:
    """Registers the node and keeps it Ready (the heartbeat thread)."""

    # set by ProcessKubelet.__init__ / _start_log_server
    rest: Rest
    node_name: str
    capacity: dict[str, str]
    labels: dict[str, str]
    lease_seconds: int
    log_port: int
    _stop: threading.Event

    def _node_status(self) -> dict:
        ts = now_rfc3339()

        def cond(t: str, status: str, reason: str, msg: str) -> dict:
            return {
                "type": t,
                "status": status,
                "reason": reason,
                "message": msg,
                "lastHeartbeatTime": ts,
                "lastTransitionTime": self._boot_time,
            }

        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": [
                cond(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "process kubelet is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {
                "machineID": self._machine_id,
                "systemUUID": self._machine_id,
                "bootID": self._boot_id,
                "kernelVersion": platform.release(),
                "osImage": "amlfs process kubelet",
                "containerRuntimeVersion": "process://1",
                "kubeletVersion": self._kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": _go_arch(),
            },
        }

    def _register_node(self) -> None:
        self._boot_time = now_rfc3339()
        self._boot_id = str(uuid.uuid4())
        self._machine_id = uuid.uuid5(uuid.NAMESPACE_DNS, self.node_name).hex
        try:
            self._kubelet_version = self.rest.get("/version").get("gitVersion", "v0.0.0")
        except ApiError:
            self._kubelet_version = "v0.0.0"
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": _go_arch(),
            "amlfs.dev/process-kubelet": "true",
            **self.labels,
        }
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels}}
        try:
            self.rest.request("POST", "/api/v1/nodes", body=node)
        except ApiError as e:
            if e.status != 409:
                raise
            self.rest.merge_patch(f"/api/v1/nodes/{self.node_name}", {"metadata": {"labels": labels}})
        self._patch_node_status()

    def _patch_node_status(self) -> None:
        self.rest.merge_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()})

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": now_micro(),
        }
        try:
            self.rest.merge_patch(path, {"spec": spec})
        except ApiError as e:
            if e.status != 404:
                raise
            node = self.rest.get(f"/api/v1/nodes/{self.node_name}")
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.node_name,
                    "namespace": "kube-node-lease",
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Node",
                            "name": self.node_name,
                            "uid": node["metadata"]["uid"],
                        }
                    ],
                },
                "spec": spec,
            }
            self.rest.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body=lease)

    def _heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(min(10.0, self.lease_seconds / 4)):
            try:
                self._renew_lease()
                if time.monotonic() - last_status > 30:
                    self._patch_node_status()
                    last_status = time.monotonic()
            except Exception as e:  # keep beating; the apiserver may be restarting
                log.warning("heartbeat failed: %s", e)


def _go_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)
