"""Pod volumes on the host: emptyDir, configMap, secret, downwardAPI, projected and hostPath written to
``<pod dir>/volumes/<name>``, and the ServiceAccount token of the ``kube-api-access-*`` volume (TokenRequest API,
refreshed at 80% of its lifetime) plus a kubeconfig using it for pods without mount namespaces."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from .common import ConfigError
from .rest import Rest
from .runtime import PodRuntime


class VolumesMixin:
    """Materialises a pod's volumes once, before its first container starts."""

    # set by ProcessKubelet.__init__
    rest: Rest
    apiserver_host: str
    apiserver_port: int

    def _prepare_volumes(self, rt: PodRuntime) -> None:
        """Write every pod volume into ``<pod dir>/volumes/<name>``: emptyDir,
        configMap, secret, downwardAPI, projected (serviceAccountToken via the
        TokenRequest API, configMap, secret, downwardAPI), hostPath (used in
        place). Raises ConfigError for missing objects and unsupported types."""
        for v in rt.pod["spec"].get("volumes", []) or []:
            name = v["name"]
            if "hostPath" in v:
                rt.volumes[name] = Path(v["hostPath"]["path"])
                continue
            d = rt.dir / "volumes" / name
            d.mkdir(parents=True, exist_ok=True)
            rt.volumes[name] = d
            if "emptyDir" in v:
                continue
            if "configMap" in v:
                files = self._configmap_files(rt, v["configMap"])
                ro = True
            elif "secret" in v:
                files = self._secret_files(rt, {**v["secret"], "name": v["secret"].get("secretName")})
                ro = True
            elif "downwardAPI" in v:
                files = self._downward_files(rt, v["downwardAPI"])
                ro = True
            elif "projected" in v:
                files = {}
                for src in v["projected"].get("sources") or []:
                    if "serviceAccountToken" in src:
                        sat = src["serviceAccountToken"]
                        files[sat["path"]] = self._request_token(rt, sat).encode()
                        rt.sa_volume = name
                        rt.sa_token_source = sat
                    elif "configMap" in src:
                        files.update(self._configmap_files(rt, src["configMap"]))
                    elif "secret" in src:
                        files.update(self._secret_files(rt, src["secret"]))
                    elif "downwardAPI" in src:
                        files.update(self._downward_files(rt, src["downwardAPI"]))
                    else:
                        raise ConfigError(f"volume {name}: unsupported projected source {sorted(src)}")
                ro = True
            else:
                kinds = sorted(k for k in v if k != "name")
                raise ConfigError(f"volume {name}: volume type {kinds} is not supported by the process kubelet")
            for rel, data in files.items():
                target = d / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write_bytes(target, data)
            if ro:
                rt.read_only.add(name)
        if rt.sa_volume is not None:
            self._write_pod_kubeconfig(rt)

    @staticmethod
    def _select_items(data: dict[str, bytes], items: list[dict] | None) -> dict[str, bytes]:
        if not items:
            return dict(data)
        out = {}
        for it in items:
            if it["key"] not in data:
                raise ConfigError(f"couldn't find key {it['key']}")
            out[it.get("path", it["key"])] = data[it["key"]]
        return out

    def _configmap_files(self, rt: PodRuntime, ref: dict) -> dict[str, bytes]:
        cm = self.rest.get_or_none(f"/api/v1/namespaces/{rt.namespace}/configmaps/{ref['name']}")
        if cm is None:
            if ref.get("optional"):
                return {}
            raise ConfigError(f'configmap "{ref["name"]}" not found')
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        return self._select_items(data, ref.get("items"))

    def _secret_files(self, rt: PodRuntime, ref: dict) -> dict[str, bytes]:
        sec = self.rest.get_or_none(f"/api/v1/namespaces/{rt.namespace}/secrets/{ref['name']}")
        if sec is None:
            if ref.get("optional"):
                return {}
            raise ConfigError(f'secret "{ref["name"]}" not found')
        data = {k: base64.b64decode(v) for k, v in (sec.get("data") or {}).items()}
        return self._select_items(data, ref.get("items"))

    def _downward_files(self, rt: PodRuntime, spec: dict) -> dict[str, bytes]:
        out = {}
        for it in spec.get("items") or []:
            if "fieldRef" in it:
                out[it["path"]] = self._field_ref(rt, it["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in it:
                ref = it["resourceFieldRef"]
                c = next((x for x in rt.all_containers() if x.name == ref.get("containerName")), rt.containers[0])
                out[it["path"]] = self._resource_field_ref(rt, c, ref).encode()
        return out

    def _request_token(self, rt: PodRuntime, sat: dict) -> str:
        """A pod-bound token for the pod's ServiceAccount (TokenRequest API),
        refreshed at 80% of its lifetime like the kubelet's token manager."""
        sa = rt.pod["spec"].get("serviceAccountName") or "default"
        exp = int(sat.get("expirationSeconds", 3607))
        spec: dict[str, Any] = {
            "expirationSeconds": exp,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": rt.name, "uid": rt.uid},
        }
        if sat.get("audience"):
            spec["audiences"] = [sat["audience"]]
        tr = self.rest.request(
            "POST",
            f"/api/v1/namespaces/{rt.namespace}/serviceaccounts/{sa}/token",
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        rt.sa_refresh_at = time.monotonic() + 0.8 * exp
        return tr["status"]["token"]

    def _refresh_token(self, rt: PodRuntime) -> None:
        sat = rt.sa_token_source
        token = self._request_token(rt, sat)
        _atomic_write_bytes(rt.volumes[rt.sa_volume] / sat["path"], token.encode())

    def _write_pod_kubeconfig(self, rt: PodRuntime) -> None:
        """A kubeconfig acting as the pod's ServiceAccount (tokenFile), for
        in-pod clients when mount namespaces are not available."""
        d = rt.volumes[rt.sa_volume]
        sa = rt.pod["spec"].get("serviceAccountName") or "default"
        user = f"system:serviceaccount:{rt.namespace}:{sa}"
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "in-cluster",
                    "cluster": {
                        "server": f"https://{self.apiserver_host}:{self.apiserver_port}",
                        "certificate-authority": str(d / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": user, "user": {"tokenFile": str(d / "token")}}],
            "contexts": [
                {
                    "name": "in-cluster",
                    "context": {"cluster": "in-cluster", "namespace": rt.namespace, "user": user},
                }
            ],
            "current-context": "in-cluster",
        }
        _atomic_write_bytes(rt.dir / "sa-kubeconfig", json.dumps(kubeconfig, indent=2).encode())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
