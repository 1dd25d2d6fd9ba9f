"""What a container runs with: its environment (the kubelet's own minus KUBECONFIG, the in-cluster service env, the
pod's ServiceAccount and volume hints, then envFrom/env with secretKeyRef, configMapKeyRef, fieldRef and
resourceFieldRef resolved) and its argv (command/args with ``$(VAR)`` expansion, or the image's entrypoint)."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

from .common import IN_POD_TERMINATION_LOG, ConfigError, ImageNotFound, parse_quantity
from .rest import Rest
from .runtime import Container, PodRuntime


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are replaced,
    undefined references are left as they are, ``$$`` escapes ``$``."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "$" and i + 1 < n:
            nxt = s[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                j = s.find(")", i + 2)
                if j != -1:
                    name = s[i + 2 : j]
                    out.append(env[name] if name in env else s[i : j + 1])
                    i = j + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


class EnvMixin:
    """Resolves env and argv; raises ConfigError while a referenced object or key is missing."""

    # set by ProcessKubelet.__init__
    rest: Rest
    apiserver_host: str
    apiserver_port: int
    mount_namespaces: bool
    extra_env: dict[str, str]
    capacity: dict[str, str]
    image_commands: dict[str, list[str]]

    def _base_env(self, rt: PodRuntime, c: Container) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",) and not k.startswith("AMLFS_K8S_")}
        venv_bin = str(Path(sys.prefix) / "bin")
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
            parts = env.get("PATH", "").split(os.pathsep)
            if venv_bin not in parts:
                env["PATH"] = os.pathsep.join([venv_bin, *[p for p in parts if p]])
        env["HOSTNAME"] = rt.name
        env["KUBERNETES_SERVICE_HOST"] = self.apiserver_host
        env["KUBERNETES_SERVICE_PORT"] = str(self.apiserver_port)
        env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(self.apiserver_port)
        env["AMLFS_POD_DIR"] = str(rt.dir)  # host path (hidden in the pod if it mounts over it)
        mounts = c.spec.get("volumeMounts") or []
        sa_mount = next((m for m in mounts if rt.sa_volume is not None and m["name"] == rt.sa_volume), None)
        if self.mount_namespaces:
            env["AMLFS_TERMINATION_LOG"] = IN_POD_TERMINATION_LOG
            if sa_mount is not None:
                env["AMLFS_SA_DIR"] = sa_mount["mountPath"]
        else:
            env["AMLFS_TERMINATION_LOG"] = str(c.term_file)
            if sa_mount is not None:
                env["AMLFS_SA_DIR"] = str(rt.volumes[rt.sa_volume])
                # No real mount at /var/run/secrets/...: in-cluster loaders
                # fail there, and clients fall back to this kubeconfig.
                env["KUBECONFIG"] = str(rt.dir / "sa-kubeconfig")
            vols = {
                m["mountPath"]: str(rt.volumes[m["name"]] / m.get("subPath", ""))
                for m in mounts
                if m["name"] in rt.volumes
            }
            if vols:
                env["AMLFS_POD_VOLUMES"] = json.dumps(vols)
        if rt.gpus:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(str(i) for i in rt.gpus)
        env.update(self.extra_env)
        return env

    def _container_env(self, rt: PodRuntime, c: Container) -> dict[str, str]:
        """The container's own env (envFrom, then env), resolved; raises
        ConfigError while a referenced object or key is missing."""
        ns = rt.namespace
        cache: dict[tuple[str, str], dict | None] = {}

        def obj(kind: str, name: str) -> dict | None:
            if (kind, name) not in cache:
                cache[(kind, name)] = self.rest.get_or_none(f"/api/v1/namespaces/{ns}/{kind}/{name}")
            return cache[(kind, name)]

        out: dict[str, str] = {}
        for ef in c.spec.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            if "configMapRef" in ef:
                ref = ef["configMapRef"]
                o = obj("configmaps", ref["name"])
                if o is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'configmap "{ref["name"]}" not found')
                for k, v in (o.get("data") or {}).items():
                    out[prefix + k] = v
            elif "secretRef" in ef:
                ref = ef["secretRef"]
                o = obj("secrets", ref["name"])
                if o is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'secret "{ref["name"]}" not found')
                for k, v in (o.get("data") or {}).items():
                    out[prefix + k] = base64.b64decode(v).decode(errors="replace")
        for e in c.spec.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                out[name] = expand(e.get("value", ""), out)
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf or "configMapKeyRef" in vf:
                secret = "secretKeyRef" in vf
                ref = vf["secretKeyRef" if secret else "configMapKeyRef"]
                kind = "secrets" if secret else "configmaps"
                o = obj(kind, ref["name"])
                data = (o or {}).get("data") or {}
                if o is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    what = "secret" if secret else "configmap"
                    if o is None:
                        raise ConfigError(f'{what} "{ref["name"]}" not found')
                    raise ConfigError(f"couldn't find key {ref['key']} in {what} {ns}/{ref['name']}")
                val = data[ref["key"]]
                out[name] = base64.b64decode(val).decode(errors="replace") if secret else val
            elif "fieldRef" in vf:
                out[name] = self._field_ref(rt, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                out[name] = self._resource_field_ref(rt, c, vf["resourceFieldRef"])
        return out

    def _field_ref(self, rt: PodRuntime, path: str) -> str:
        meta, spec = rt.pod["metadata"], rt.pod["spec"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.hostIP": "127.0.0.1",
            "status.podIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        for prefix, src in (
            ("metadata.labels", meta.get("labels") or {}),
            ("metadata.annotations", meta.get("annotations") or {}),
        ):
            if path.startswith(prefix + "['") and path.endswith("']"):
                return src.get(path[len(prefix) + 2 : -2], "")
            if path == prefix:
                return "\n".join(f'{k}="{v}"' for k, v in sorted(src.items()))
        raise ConfigError(f"unsupported fieldRef {path}")

    def _resource_field_ref(self, rt: PodRuntime, c: Container, ref: dict) -> str:
        import math

        target = c
        if ref.get("containerName"):
            target = next((x for x in rt.all_containers() if x.name == ref["containerName"]), c)
        kind, _, res = ref["resource"].partition(".")
        val = ((target.spec.get("resources") or {}).get(kind) or {}).get(res)
        if val is None:  # unset limit: node allocatable, like the kubelet
            val = self.capacity.get(res, "0")
        divisor = parse_quantity(ref.get("divisor", "1"))
        return str(math.ceil(parse_quantity(val) / divisor))

    def _argv(self, c: Container, env: dict[str, str]) -> list[str]:
        spec = c.spec
        command = [expand(x, env) for x in spec.get("command") or []]
        args = [expand(x, env) for x in spec.get("args") or []]
        if not command:
            image = spec.get("image", "")
            entry = self.image_commands.get(image)
            if entry is None:
                base = image.split("@", 1)[0]
                if ":" in base.rsplit("/", 1)[-1]:
                    base = base.rsplit(":", 1)[0]
                entry = self.image_commands.get(base)
            if entry is None:  # as a registry without the image answers a real kubelet's pull
                raise ImageNotFound(
                    f'failed to pull and unpack image "{image}": not found (the process kubelet runs images '
                    f"that have an entry in its image_commands)"
                )
            command = list(entry)
        return command + args
