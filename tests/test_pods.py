"""Trainer pod builders and the operator's reading of pods into observations (no cluster needed)."""

from __future__ import annotations

import json
import time

from kubernetes import client

from amlfs import core, storage
from amlfs.controller.pods import PodSettings, merge_template, packs, pod_name, trainer_pod
from amlfs.controller.reconcile import Pass, Reconciler, Settings
from amlfs.controller.rewards import PushedResult
from amlfs.spec import LossSearchSpec, spec_from_json
from amlfs.status import Checkpoint, LossSearchStatus, SampleStatus

SPEC = LossSearchSpec.model_validate(
    {
        "search": {"epochs": 3, "samplesPerEpoch": 2},
        "storage": {"uri": "s3://bkt/p", "secretName": "creds", "endpoint": "http://s3:9000"},
        "trainer": {
            "image": "reg/amlfs-trainer:1",
            "resources": {"gpu": 1, "cpu": "8", "memory": "32Gi"},
            "podTemplate": {
                "metadata": {"labels": {"kueue.x-k8s.io/queue-name": "gpu", "amlfs.io/search": "x"}},
                "spec": {
                    "nodeSelector": {"gpu": "h100"},
                    "priorityClassName": "high",
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                    "containers": [
                        {
                            "name": "trainer",
                            "env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "AMLFS_EPOCH", "value": "999"}],
                        }
                    ],
                },
            },
        },
    }
)
START = core.StartSample(
    epoch=1,
    sample=0,
    attempt=1,
    theta=[0.0] * 13,
    output="s3://bkt/p/ns/s/e",
    start=Checkpoint(uri="s3://bkt/p/ns/s/epoch-0000/sample-01/checkpoint.pt", sha256="ab" * 32),
)


def env_of(pod: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_pod_names_are_deterministic_and_fit_label_limits():
    assert pod_name("demo", 3, 2) == "demo-e3-s2"
    assert pod_name("demo", 3, 2, attempt=1, restarts=2) == "demo-e3-s2-a1-r2"
    long = "x" * 40
    n1, n2 = pod_name(long, 12345, 255, 20, 50), pod_name(long[:-1] + "y", 12345, 255, 20, 50)
    assert len(n1) <= 63 and n1 != n2 and n1 == pod_name(long, 12345, 255, 20, 50)


def test_trainer_pod_carries_the_cli_contract_and_user_template():
    pod = trainer_pod(SPEC, "s", "ns", START, PodSettings(pushgateway="http://pgw:9091"))
    c = pod["spec"]["containers"][0]
    env = env_of(pod)
    assert "command" not in c  # the image's entrypoint is amlfs-trainer
    assert spec_from_json(env["AMLFS_SPEC"]) == SPEC
    assert (env["AMLFS_EPOCH"], env["AMLFS_SAMPLE"], env["AMLFS_ATTEMPT"]) == ("1", "0", "1")
    assert json.loads(env["AMLFS_THETA"]) == START.theta
    assert env["AMLFS_START"] == START.start.uri and env["AMLFS_START_SHA256"] == START.start.sha256
    assert env["AMLFS_PUSHGATEWAY"] == "http://pgw:9091" and env["AWS_ENDPOINT_URL_S3"] == "http://s3:9000"
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["NCCL_DEBUG"] == "INFO"  # user env added, contract env not overridable
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["resources"]["requests"]["cpu"] == "8"
    assert c["resources"]["requests"]["ephemeral-storage"] == c["resources"]["limits"]["ephemeral-storage"] == "20Gi"
    volumes = {v["name"]: v["emptyDir"] for v in pod["spec"]["volumes"]}
    assert volumes["tmp"] == {"sizeLimit": "20Gi"} and volumes["dshm"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] == 3600
    assert spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert spec["nodeSelector"] == {"gpu": "h100"} and spec["priorityClassName"] == "high"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    labels = pod["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu" and labels["amlfs.io/search"] == "s"
    assert pod["metadata"]["name"] == "s-e1-s0-a1"
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(SPEC.model_dump())  # credentials never in the spec


def test_trainer_pod_uid_is_the_operators_setting_or_left_to_the_platform(monkeypatch):
    """Default: uid/gid/fsGroup 1000 (the trainer image's USER). AMLFS_POD_RUN_AS_USER="" (OpenShift's
    restricted-v2 assigns a uid per namespace and rejects any other) drops all three; runAsNonRoot stays."""
    from amlfs.controller.main import parser

    def security(env: str | None, *argv: str) -> dict:
        if env is None:
            monkeypatch.delenv("AMLFS_POD_RUN_AS_USER", raising=False)
        else:
            monkeypatch.setenv("AMLFS_POD_RUN_AS_USER", env)
        uid = parser().parse_args(list(argv)).pod_run_as_user
        return trainer_pod(SPEC, "s", "ns", START, Settings(run_as_user=uid).pods())["spec"]["securityContext"]

    restricted = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert security(None) == {**restricted, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
    assert security("") == security(" ") == restricted
    assert security(None, "--pod-run-as-user", "") == restricted
    assert security("", "--pod-run-as-user", "2000") == {
        **restricted,
        "runAsUser": 2000,
        "runAsGroup": 2000,
        "fsGroup": 2000,
    }
    assert trainer_pod(SPEC, "s", "ns", START, PodSettings(run_as_user=None))["spec"]["securityContext"] == restricted
    for bad in ("0", "root", "-1"):
        monkeypatch.setenv("AMLFS_POD_RUN_AS_USER", bad)
        try:
            parser().parse_args([])
        except SystemExit as exc:
            assert exc.code == 2, bad
        else:
            raise AssertionError(f"AMLFS_POD_RUN_AS_USER={bad} accepted")


def test_merge_template_merges_named_lists():
    base = {
        "metadata": {"name": "p", "namespace": "n", "labels": {"amlfs.io/search": "s"}},
        "spec": {
            "containers": [{"name": "trainer", "env": [{"name": "A", "value": "1"}]}],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    out = merge_template(
        base,
        {
            "spec": {
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "d"}}],
                "containers": [{"name": "trainer", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            }
        },
    )
    assert [v["name"] for v in out["spec"]["volumes"]] == ["tmp", "data"]
    assert out["spec"]["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert out["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]


class FakeRewards:
    def __init__(self, results: dict) -> None:
        self.data = results

    def results(self, namespace: str, search: str, not_before: float | None = None) -> dict:
        return self.data

    def cached(self, namespace: str, search: str) -> dict:
        return self.data


def pod(
    phase: str,
    exit_code: int | None = None,
    reason: str = "",
    message: str = "",
    finished: float = 0.0,
    conditions: list | None = None,
) -> dict:
    status: dict = {"phase": phase, "reason": reason, "conditions": conditions or []}
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "message": message,
                        "finishedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished or time.time())),
                    }
                }
            }
        ]
    return {"metadata": {"labels": {}}, "status": status}


def test_pods_and_rewards_become_observations(tmp_path):
    spec = SPEC.model_copy(update={"search": SPEC.search.model_copy(update={"samples_per_epoch": 8})})
    thetas = [[float(i)] * 13 for i in range(8)]
    st = LossSearchStatus(
        mu=[0.0] * 13,
        sigma=0.2,
        epoch=0,
        samples=[SampleStatus(index=i, theta=thetas[i], state="Running") for i in range(8)],
    )
    rec = Reconciler(client.ApiClient(), Settings(reward_timeout=10))
    rec.rewards = FakeRewards({(0, 2): PushedResult(0.75, False, "c" * 64), (0, 3): PushedResult(None, True, "")})
    root = f"file://{tmp_path}"
    storage.write_json(
        f"{root}/epoch-0000/sample-05/result.json",
        {"status": "ok", "reward": 0.5, "sha256": "d" * 64, "theta": thetas[5]},
    )
    pods = {
        "s-e0-s0": pod("Running"),
        "s-e0-s1": pod("Failed", 2, message="task.dataRoot: no CIFAR-10 files"),
        "s-e0-s2": pod("Succeeded", 0),
        "s-e0-s3": pod("Succeeded", 0),
        "s-e0-s4": pod("Failed", 137, reason="Evicted", conditions=[{"type": "DisruptionTarget", "status": "True"}]),
        "s-e0-s5": pod("Succeeded", 0, finished=time.time() - 60),  # no push: falls back to result.json
        "s-e0-s6": pod("Succeeded", 0),  # no push yet, within the timeout: still waiting
        "s-e0-s7": pod("Failed", 1, message="CUDA error"),
    }
    p = Pass("ns", "s", {}, spec, st)
    obs, waiting = rec.observe(p, pods, root)
    got = {o.sample: (o.outcome, o.reward, o.sha256) for o in obs}
    assert got[0] == ("running", None, "")
    assert got[1][0] == "config-error"
    assert got[2] == ("succeeded", 0.75, "c" * 64)
    assert got[3][0] == "no-reward"
    assert got[4][0] == "preempted"
    assert got[5] == ("succeeded", 0.5, "d" * 64)
    assert got[6][0] == "running" and waiting
    assert got[7][0] == "failed" and "CUDA error" in next(o.message for o in obs if o.sample == 7)
    assert [e[1] for e in p.events] == ["RewardFromStorage"]


def packed_spec(k: int, b: int = 5) -> LossSearchSpec:
    doc = SPEC.model_dump(by_alias=True)
    doc["search"]["samplesPerEpoch"], doc["trainer"]["samplesPerPod"] = b, k
    return LossSearchSpec.model_validate(doc)


def test_samples_per_pod_makes_one_pod_per_pack_with_every_member_in_its_environment():
    spec = packed_spec(2)
    st, actions = core.step(spec, None, [], "s3://bkt/p/ns/s")
    starts = [a for a in actions if isinstance(a, core.StartSample)]
    assert [a.pack for a in starts] == [0, 0, 1, 1, 2] and [x.pack for x in st.samples] == [0, 0, 1, 1, 2]
    groups = packs(starts)
    assert [[a.sample for a in g] for g in groups] == [[0, 1], [2, 3], [4]]  # ceil(5 / 2) pods, k not dividing B
    pods = [trainer_pod(spec, "s", "ns", g, PodSettings()) for g in groups]
    assert [p["metadata"]["name"] for p in pods] == ["s-e0-p0", "s-e0-p1", "s-e0-p2"]
    first = pods[0]
    assert first["metadata"]["labels"]["amlfs.io/pack"] == "0" and "amlfs.io/sample" not in first["metadata"]["labels"]
    assert first["metadata"]["annotations"]["amlfs.io/samples"] == "0,1"
    members = json.loads(env_of(first)["AMLFS_MEMBERS"])
    assert [m["sample"] for m in members] == [0, 1]
    assert [m["theta"] for m in members] == [st.samples[0].theta, st.samples[1].theta]
    assert [m["output"] for m in members] == [f"s3://bkt/p/ns/s/epoch-0000/sample-0{i}" for i in (0, 1)]
    # a pack of one is spelled as a single sample; k = 1 keeps one pod per sample, named as always
    assert env_of(pods[2])["AMLFS_SAMPLE"] == "4" and "AMLFS_MEMBERS" not in env_of(pods[2])
    _, alone = core.step(packed_spec(1), None, [], "s3://bkt/p/ns/s")
    assert [trainer_pod(SPEC, "s", "ns", g, PodSettings())["metadata"]["name"] for g in packs(alone)] == [  # type: ignore[arg-type]
        f"s-e0-s{i}" for i in range(5)
    ]


def test_a_failed_pack_keeps_its_finished_members_and_retries_the_rest_in_one_pod(tmp_path):
    spec, root = packed_spec(2), f"file://{tmp_path}"
    st, _ = core.step(spec, None, [], root)
    st, _ = core.step(spec, st, [core.Observation(0, i, "running") for i in range(5)], root)
    assert [x.state for x in st.samples] == ["Running"] * 5
    # pack 0 crashed after its first member wrote its result (a sequential pack on a CPU); pack 1 finished;
    # pack 2 was evicted before its member finished
    storage.write_json(
        f"{root}/epoch-0000/sample-00/result.json",
        {"status": "ok", "reward": 0.5, "sha256": "d" * 64, "theta": st.samples[0].theta},
    )
    rec = Reconciler(client.ApiClient(), Settings(reward_timeout=10))
    rec.rewards = FakeRewards(
        {(0, 2): PushedResult(0.75, False, "c" * 64), (0, 3): PushedResult(0.25, False, "e" * 64)}
    )
    pods = {
        "s-e0-p0": pod("Failed", 1, message="Killed"),
        "s-e0-p1": pod("Succeeded", 0),
        "s-e0-p2": pod("Failed", 137, reason="Evicted", conditions=[{"type": "DisruptionTarget", "status": "True"}]),
    }
    obs, _ = rec.observe(Pass("ns", "s", {}, spec, st), pods, root)
    assert {o.sample: o.outcome for o in obs} == {
        0: "succeeded",
        1: "failed",
        2: "succeeded",
        3: "succeeded",
        4: "preempted",
    }
    st, actions = core.step(spec, st, obs, root)
    retry = packs([a for a in actions if isinstance(a, core.StartSample)])
    built = [trainer_pod(spec, "s", "ns", g, PodSettings()) for g in retry]
    assert [p["metadata"]["name"] for p in built] == ["s-e0-p0-a1", "s-e0-p2-r1"]
    env = env_of(built[0])
    assert (env["AMLFS_SAMPLE"], env["AMLFS_ATTEMPT"]) == ("1", "1")  # the finished member is not retrained
    assert [x.state for x in st.samples] == ["Succeeded", "Pending", "Succeeded", "Succeeded", "Pending"]


def test_a_changed_samples_per_pod_applies_from_the_next_epoch():
    root = "s3://bkt/p/ns/s"
    st, _ = core.step(packed_spec(2, 4), None, [], root)
    done = [core.Observation(0, i, "succeeded", reward=0.1 * i, sha256="a" * 64) for i in range(3)]
    st, actions = core.step(packed_spec(1, 4), st, [*done, core.Observation(0, 3, "failed")], root)
    assert [(a.sample, a.pack) for a in actions if isinstance(a, core.StartSample)] == [(3, 1)]
    st, actions = core.step(packed_spec(1, 4), st, [core.Observation(0, 3, "succeeded", 1, 0.9, "b" * 64)], root)
    assert st.epoch == 1 and [x.pack for x in st.samples] == [None] * 4
    assert [a.pack for a in actions if isinstance(a, core.StartSample)] == [None] * 4


def test_the_device_is_explicit_and_a_cpu_pod_sees_no_gpu():
    gpu = env_of(trainer_pod(SPEC, "s", "ns", START, PodSettings()))
    assert gpu["AMLFS_DEVICE"] == "cuda" and "NVIDIA_VISIBLE_DEVICES" not in gpu  # the device plugin sets it
    doc = SPEC.model_dump(by_alias=True)
    doc["trainer"]["resources"]["gpu"] = 0
    cpu_spec = LossSearchSpec.model_validate(doc)
    cpu = env_of(trainer_pod(cpu_spec, "s", "ns", START, PodSettings()))
    assert cpu["AMLFS_DEVICE"] == "cpu" and cpu["NVIDIA_VISIBLE_DEVICES"] == "void"
    # the tuning knobs stay the user's to set through the pod template; the rest of the contract does not
    doc["trainer"]["podTemplate"]["spec"]["containers"][0]["env"] += [{"name": "AMLFS_DEVICE", "value": "cuda:1"}]
    tuned = env_of(trainer_pod(LossSearchSpec.model_validate(doc), "s", "ns", START, PodSettings()))
    assert tuned["AMLFS_DEVICE"] == "cuda:1" and tuned["AMLFS_EPOCH"] == "1" and tuned["NCCL_DEBUG"] == "INFO"
    names = [
        e["name"]
        for e in trainer_pod(LossSearchSpec.model_validate(doc), "s", "ns", START, PodSettings())["spec"]["containers"][
            0
        ]["env"]
    ]
    assert len(names) == len(set(names))
