"""Small builders of plain-dict trainer Pods, in the style of dask-kubernetes' operator.

A pod runs exactly the trainer contract (`amlfs.contract`): the trainer image's entrypoint is `amlfs-trainer`,
configured by the AMLFS_* environment spelling of an invocation, so the same command trains a sample in a pod
and in `amlfs run`.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

from amlfs import contract
from amlfs.core import StartSample
from amlfs.spec import LossSearchSpec, spec_to_json

LABEL_SEARCH = "amlfs.io/search"
LABEL_EPOCH = "amlfs.io/epoch"
LABEL_SAMPLE = "amlfs.io/sample"
LABEL_ATTEMPT = "amlfs.io/attempt"
LABEL_PACK = "amlfs.io/pack"
ANNOTATION_SAMPLES = "amlfs.io/samples"  # a pack pod's sample indices, comma-separated
LABEL_COMPONENT = "app.kubernetes.io/component"
MAX_NAME = 63


@dataclass(frozen=True)
class PodSettings:
    """Operator-wide settings that reach the pods."""

    pushgateway: str = ""  # URL the trainers push their result to
    s3_endpoint: str = ""  # default S3 endpoint when the spec names none
    #: uid, gid and fsGroup of the trainer pods; None leaves them to the platform (OpenShift assigns them per
    #: namespace under its restricted-v2 SCC). runAsNonRoot is set either way.
    run_as_user: int | None = 1000


def pod_name(search: str, epoch: int, sample: int, attempt: int = 0, restarts: int = 0, pack: int | None = None) -> str:
    """`<search>-e<epoch>-s<sample>` (a pack pod: `-p<pack>`), plus `-a<attempt>` for retries and `-r<n>` after
    preemptions.

    Deterministic, so a restarted operator finds (and never duplicates) the pods it made. A pack's unfinished
    members always move on together (a pod's end gives all of them the same outcome), so (pack, attempt,
    restarts) names one set of members. Names longer than a label value (63) keep a hash of the search name
    instead of its tail.
    """
    unit = f"p{pack}" if pack is not None else f"s{sample}"
    suffix = f"-e{epoch}-{unit}" + (f"-a{attempt}" if attempt else "") + (f"-r{restarts}" if restarts else "")
    if len(search) + len(suffix) > MAX_NAME:
        digest = hashlib.sha256(search.encode()).hexdigest()[:8]
        search = f"{search[: MAX_NAME - len(suffix) - 9].rstrip('-')}-{digest}"
    return f"{search}{suffix}"


def action_pod_name(search: str, a: StartSample) -> str:
    return pod_name(search, a.epoch, a.sample, a.attempt, a.restarts, a.pack)


def packs(actions: list[StartSample]) -> list[list[StartSample]]:
    """StartSample actions grouped into the pods that train them: one per (epoch, pack, attempt, restarts), in
    sample order; a sample without a pack alone."""
    groups: dict[tuple[int, ...], list[StartSample]] = {}
    for a in sorted(actions, key=lambda a: (a.epoch, a.sample)):
        unit = (0, a.pack) if a.pack is not None else (1, a.sample)
        groups.setdefault((a.epoch, *unit, a.attempt, a.restarts), []).append(a)
    return list(groups.values())


def labels(search: str, epoch: int, sample: int, attempt: int, pack: int | None = None) -> dict[str, str]:
    unit = {LABEL_PACK: str(pack)} if pack is not None else {LABEL_SAMPLE: str(sample)}
    return {
        LABEL_SEARCH: search,
        LABEL_EPOCH: str(epoch),
        **unit,
        LABEL_ATTEMPT: str(attempt),
        LABEL_COMPONENT: "trainer",
        "app.kubernetes.io/name": "amlfs",
        "app.kubernetes.io/managed-by": "amlfs",
    }


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


Pack = StartSample | list[StartSample]  # what one pod trains: a sample, or a group from `packs`


def _members(pack: Pack) -> list[StartSample]:
    return pack if isinstance(pack, list) else [pack]


def invocation(
    spec: LossSearchSpec, search: str, namespace: str, pack: Pack, settings: PodSettings
) -> contract.Invocation:
    """The trainer invocation a pod runs: its pack's samples (of one epoch, attempt and start; often one)."""
    pack = _members(pack)
    a = pack[0]
    return contract.Invocation(
        spec=spec_to_json(spec),
        search=search,
        namespace=namespace,
        epoch=a.epoch,
        attempt=a.attempt,
        members=tuple(contract.Member(m.sample, tuple(m.theta), m.output) for m in pack),
        start=a.start.uri if a.start is not None else "",
        start_sha256=a.start.sha256 if a.start is not None else "",
        metrics_port=spec.trainer.metrics_port,
        pushgateway=settings.pushgateway,
        cache_dir="/tmp/amlfs-cache",
        # explicit, so that a GPU pod on a node where CUDA is unusable fails at once instead of training on the CPU
        device="cuda" if spec.trainer.resources.gpu else "cpu",
    )


def trainer_env(
    spec: LossSearchSpec, search: str, namespace: str, pack: Pack, settings: PodSettings
) -> list[dict[str, Any]]:
    env = [_env(k, v) for k, v in contract.to_env(invocation(spec, search, namespace, pack, settings)).items()]
    env.append(_env("HOME", "/tmp"))
    if not spec.trainer.resources.gpu:
        # the NVIDIA runtime (a node's default runtime on many GPU clusters) would otherwise give a CPU pod every
        # GPU of the node: the CUDA images set NVIDIA_VISIBLE_DEVICES=all
        env.append(_env("NVIDIA_VISIBLE_DEVICES", "void"))
    endpoint = spec.storage.endpoint or settings.s3_endpoint
    if endpoint:
        env.append(_env("AWS_ENDPOINT_URL_S3", endpoint))
    if spec.storage.region:
        env.append(_env("AWS_REGION", spec.storage.region))
    if spec.storage.secret_name:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": spec.storage.secret_name, "key": key}}})
    return env


def pod_security_context(uid: int | None) -> dict[str, Any]:
    """Restricted-profile pod security: non-root, RuntimeDefault seccomp, and the given uid as user, group and
    fsGroup, or none of the three when the platform assigns them (the image's numeric USER satisfies
    runAsNonRoot where it does not)."""
    ids = {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid} if uid is not None else {}
    return {"runAsNonRoot": True, **ids, "seccompProfile": {"type": "RuntimeDefault"}}


def trainer_pod(spec: LossSearchSpec, search: str, namespace: str, pack: Pack, settings: PodSettings) -> dict[str, Any]:
    """The pod that trains one sample, or one pack of samples (as `packs` groups them)."""
    pack = _members(pack)
    a = pack[0]
    annotations = {
        "prometheus.io/scrape": "true" if spec.trainer.metrics_port else "false",
        "prometheus.io/port": str(spec.trainer.metrics_port),
    }
    if a.pack is not None:
        annotations[ANNOTATION_SAMPLES] = ",".join(str(m.sample) for m in pack)
    res = spec.trainer.resources
    limits: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory, "ephemeral-storage": res.ephemeral_storage}
    if res.gpu:
        limits["nvidia.com/gpu"] = str(res.gpu)
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": action_pod_name(search, a),
            "namespace": namespace,
            "labels": labels(search, a.epoch, a.sample, a.attempt, a.pack),
            "annotations": annotations,
        },
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": spec.trainer.active_deadline_seconds,
            "terminationGracePeriodSeconds": 30,
            "automountServiceAccountToken": False,
            "securityContext": pod_security_context(settings.run_as_user),
            "containers": [
                {
                    "name": "trainer",
                    "image": spec.trainer.image,
                    "imagePullPolicy": spec.trainer.image_pull_policy,
                    "env": trainer_env(spec, search, namespace, pack, settings),
                    "resources": {"requests": dict(limits), "limits": limits},
                    "ports": [{"name": "metrics", "containerPort": spec.trainer.metrics_port}]
                    if spec.trainer.metrics_port
                    else [],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}],
                }
            ],
            "volumes": [
                {"name": "tmp", "emptyDir": {"sizeLimit": res.ephemeral_storage}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.memory}},
            ],
        },
    }
    if spec.trainer.pod_template:
        pod = merge_template(pod, spec.trainer.pod_template)
    return pod


def merge_template(pod: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """Merge a user's partial pod into ours: maps merge recursively, lists of named items (containers,
    volumes, volumeMounts, env) merge by name, other values from the template win. The trainer's environment
    contract and identifying labels cannot be overridden, except its tuning knobs (`contract.TUNABLE_ENV`:
    device, pack mode, threads, cudnn.benchmark)."""
    out = _merge(copy.deepcopy(pod), copy.deepcopy(template))
    out["metadata"]["name"] = pod["metadata"]["name"]
    out["metadata"]["namespace"] = pod["metadata"]["namespace"]
    out["metadata"]["labels"].update({k: v for k, v in pod["metadata"]["labels"].items() if k.startswith("amlfs.io/")})
    trainer = next(c for c in out["spec"]["containers"] if c["name"] == "trainer")
    ours = pod["spec"]["containers"][0]
    given = {e["name"]: e for e in trainer.get("env", [])}
    reserved = ({e["name"] for e in ours["env"]} | contract.ENV_NAMES) - contract.TUNABLE_ENV
    kept = [e for e in ours["env"] if e["name"] in reserved or e["name"] not in given]
    trainer["env"] = kept + [e for e in given.values() if e["name"] not in reserved]
    out["spec"]["restartPolicy"] = "Never"
    return out


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        for k, v in over.items():
            base[k] = _merge(base[k], v) if k in base else v
        return base
    if (
        isinstance(base, list)
        and isinstance(over, list)
        and all(isinstance(x, dict) and "name" in x for x in base + over)
    ):
        by_name = {x["name"]: x for x in base}
        for x in over:
            by_name[x["name"]] = _merge(by_name[x["name"]], x) if x["name"] in by_name else x
        return list(by_name.values())
    return over
