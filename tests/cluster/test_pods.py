"""Pods run and report real status (local process kubelet or a real cluster)."""

from __future__ import annotations

import json
import textwrap
import time

import pytest


def pod_yaml(name: str, image: str, command: list[str], restart: str = "Never", **spec) -> str:
    """A one-container Pod manifest (JSON is YAML) for ``kubectl apply -f -``."""
    container = {"name": "main", "image": image, "imagePullPolicy": "IfNotPresent", "command": command}
    container.update(spec.pop("container", {}))
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 5,
            "containers": [container],
            **spec,
        },
    }
    return json.dumps(pod, indent=2)


def test_kubectl_apply_pod_succeeds(cluster, namespace):
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=pod_yaml("hello", cluster.image, ["sh", "-c", "echo hello from the pod; exit 0"]),
    )
    pod = cluster.wait_pod(namespace, "hello")
    assert pod["status"]["phase"] == "Succeeded"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0
    assert term["reason"] == "Completed"
    # kubectl logs goes apiserver -> kubelet /containerLogs
    out = cluster.kubectl("logs", "-n", namespace, "hello").stdout
    assert "hello from the pod" in out


def test_failing_pod_reports_exit_code_and_message(cluster, namespace):
    script = 'echo "trial diverged" > "${AMLFS_TERMINATION_LOG:-/dev/termination-log}"; exit 3'
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pod_yaml("boom", cluster.image, ["sh", "-c", script]))
    pod = cluster.wait_pod(namespace, "boom")
    assert pod["status"]["phase"] == "Failed"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3
    assert term["reason"] == "Error"
    assert term["message"].strip() == "trial diverged"


def test_restart_policy_on_failure_restarts_until_success(cluster, namespace):
    # Fails on the first run, succeeds on the second: the marker file lives
    # in an emptyDir volume, which survives container restarts.
    script = (
        "if [ -e /tmp/amlfs-test-state/ran ]; then echo second run; exit 0; fi; "
        "touch /tmp/amlfs-test-state/ran; echo first run; exit 7"
    )
    manifest = pod_yaml(
        "flaky",
        cluster.image,
        ["sh", "-c", script],
        restart="OnFailure",
        volumes=[{"name": "state", "emptyDir": {}}],
        container={"volumeMounts": [{"name": "state", "mountPath": "/tmp/amlfs-test-state"}]},
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    pod = cluster.wait_pod(namespace, "flaky", timeout=180)
    assert pod["status"]["phase"] == "Succeeded"
    cs = pod["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 7
    assert cs["state"]["terminated"]["exitCode"] == 0
    assert "second run" in cluster.kubectl("logs", "-n", namespace, "flaky").stdout
    assert "first run" in cluster.kubectl("logs", "-n", namespace, "flaky", "--previous").stdout


def test_configmap_and_secret_volumes(cluster, namespace):
    core = cluster.core()
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"search.yaml": "lr: 0.1\n"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "stringData": {"access_key": "AK"}})
    manifest = pod_yaml(
        "mounts",
        cluster.image,
        ["sh", "-c", "cat /tmp/amlfs-test-cfg/search.yaml /tmp/amlfs-test-s3/access_key; echo"],
        volumes=[
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "s3", "secret": {"secretName": "s3"}},
        ],
        container={
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/tmp/amlfs-test-cfg"},
                {"name": "s3", "mountPath": "/tmp/amlfs-test-s3", "readOnly": True},
            ]
        },
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    pod = cluster.wait_pod(namespace, "mounts")
    out = cluster.kubectl("logs", "-n", namespace, "mounts").stdout
    assert pod["status"]["phase"] == "Succeeded", out
    assert "lr: 0.1" in out and "AK" in out


def test_env_sources_and_working_dir(cluster, namespace):
    core = cluster.core()
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "conf"}, "data": {"lr": "0.1"}})
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "envy", "labels": {"trial": "t7"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": cluster.image,
                    "imagePullPolicy": "IfNotPresent",
                    "workingDir": "/tmp",
                    "command": [
                        "sh",
                        "-c",
                        "echo LIT=$LIT SEC=$SEC LR=$LR POD=$POD NS=$NS TRIAL=$TRIAL; pwd; echo ARG=$(LIT)-x",
                    ],
                    "env": [
                        {"name": "LIT", "value": "literal"},
                        {"name": "SEC", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
                        {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "lr"}}},
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {
                            "name": "TRIAL",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['trial']"}},
                        },
                    ],
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    pod = cluster.wait_pod(namespace, "envy")
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    out = cluster.kubectl("logs", "-n", namespace, "envy").stdout
    assert f"LIT=literal SEC=s3cr3t LR=0.1 POD=envy NS={namespace} TRIAL=t7" in out
    assert "\n/tmp\n" in out
    assert "ARG=literal-x" in out  # $(VAR) expansion in command


def test_pod_uses_its_service_account_token(cluster, namespace):
    """In-pod code reaches the apiserver with the pod's own bound SA token
    (in-cluster style: KUBERNETES_SERVICE_HOST/PORT + token + ca.crt)."""
    code = textwrap.dedent("""\
        import json, os, ssl, urllib.request
        d = os.environ.get("AMLFS_SA_DIR", "/var/run/secrets/kubernetes.io/serviceaccount")
        tok = open(d + "/token").read()
        ns = open(d + "/namespace").read()
        ctx = ssl.create_default_context(cafile=d + "/ca.crt")
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
        req = urllib.request.Request(f"https://{host}:{port}/apis/authentication.k8s.io/v1/selfsubjectreviews",
            data=body, headers={"Authorization": "Bearer " + tok, "Content-Type": "application/json"})
        r = json.load(urllib.request.urlopen(req, context=ctx))
        print("USER=" + r["status"]["userInfo"]["username"], "NS=" + ns)
        """)
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "whoami"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": cluster.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["python3", "-c", code],
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    pod = cluster.wait_pod(namespace, "whoami")
    out = cluster.kubectl("logs", "-n", namespace, "whoami").stdout
    assert pod["status"]["phase"] == "Succeeded", out
    assert f"USER=system:serviceaccount:{namespace}:default NS={namespace}" in out


def test_deleting_running_pod_terminates_it(cluster, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pod_yaml("sleeper", cluster.image, ["sleep", "600"]))
    cluster.wait_pod(namespace, "sleeper", phases=("Running",))
    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", namespace, "sleeper", "--wait=true", "--timeout=60s")
    # sleep dies on SIGTERM: well within the 5 s grace period.
    assert time.monotonic() - t0 < 30
    cluster.wait_gone(namespace, "sleeper")


def test_active_deadline_seconds(cluster, namespace):
    manifest = pod_yaml("late", cluster.image, ["sleep", "600"], activeDeadlineSeconds=2)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    pod = cluster.wait_pod(namespace, "late", timeout=90)
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "DeadlineExceeded"


def test_job_completes(cluster, namespace):
    manifest = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "once"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": cluster.image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", "echo done"],
                        }
                    ],
                }
            },
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/once", "--timeout=120s")
    job = cluster.kubectl_json("get", "job", "-n", namespace, "once")
    assert job["status"]["succeeded"] == 1


def test_deployment_rolls_out(cluster, namespace):
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [
                        {
                            "name": "main",
                            "image": cluster.image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["sleep", "600"],
                        }
                    ],
                },
            },
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    cluster.kubectl("rollout", "status", "-n", namespace, "deployment/web", "--timeout=120s")
    pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "app=web")["items"]
    assert len([p for p in pods if p["status"]["phase"] == "Running"]) == 2
    cluster.kubectl("delete", "deployment", "-n", namespace, "web", "--wait=true", "--timeout=60s")


@pytest.mark.parametrize("gpus,schedulable", [(1, True), (64, False)])
def test_gpu_requests_schedule_against_node_capacity(cluster, namespace, gpus, schedulable):
    nodes = cluster.kubectl_json("get", "nodes")["items"]
    capacity = max(int(n["status"].get("allocatable", {}).get("nvidia.com/gpu", 0)) for n in nodes)
    if capacity < 1:
        pytest.skip("the cluster has no nvidia.com/gpu capacity")
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"gpu{gpus}"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": cluster.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "echo gpus=$NVIDIA_VISIBLE_DEVICES"],
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    if schedulable:
        pod = cluster.wait_pod(namespace, f"gpu{gpus}")
        assert pod["status"]["phase"] == "Succeeded"
    else:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pod = cluster.kubectl_json("get", "pod", "-n", namespace, f"gpu{gpus}")
            conds = {c["type"]: c for c in pod["status"].get("conditions", [])}
            if conds.get("PodScheduled", {}).get("reason") == "Unschedulable":
                break
            time.sleep(0.3)
        assert conds["PodScheduled"]["status"] == "False"
        assert "nvidia.com/gpu" in conds["PodScheduled"]["message"]
        assert pod["status"]["phase"] == "Pending"


def test_termination_message_falls_back_to_log_tail(cluster, namespace):
    manifest = pod_yaml(
        "lastwords",
        cluster.image,
        ["sh", "-c", "echo starting; echo 'CUDA out of memory' >&2; exit 1"],
        container={"terminationMessagePolicy": "FallbackToLogsOnError"},
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    pod = cluster.wait_pod(namespace, "lastwords")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 1
    assert "CUDA out of memory" in term["message"]


def test_volumes_over_tmp_and_dev_shm(cluster, namespace):
    """The trainer pod layout: emptyDirs at /tmp and /dev/shm (Memory), the
    SA token, and a termination message, all at once."""
    script = (
        "echo scratch > /tmp/x && echo shm > /dev/shm/y && cat /tmp/x /dev/shm/y && "
        'test -s "${AMLFS_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}/token" && '
        'echo "{\\"ok\\": true}" > "${AMLFS_TERMINATION_LOG:-/dev/termination-log}"'
    )
    manifest = pod_yaml(
        "layout",
        cluster.image,
        ["sh", "-c", script],
        volumes=[{"name": "tmp", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        container={"volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]},
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    pod = cluster.wait_pod(namespace, "layout")
    out = cluster.kubectl("logs", "-n", namespace, "layout").stdout
    assert pod["status"]["phase"] == "Succeeded", out
    assert "scratch" in out and "shm" in out
    assert json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]) == {"ok": True}


def test_kubectl_logs_follow_streams_until_exit(cluster, namespace):
    script = "for i in 1 2 3; do echo line $i; sleep 1; done"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pod_yaml("chatty", cluster.image, ["sh", "-c", script]))
    cluster.wait_pod(namespace, "chatty", phases=("Running", "Succeeded"))
    out = cluster.kubectl("logs", "-n", namespace, "chatty", "-f", timeout=60).stdout
    assert out.split() == ["line", "1", "line", "2", "line", "3"]


def test_deletion_kills_a_process_ignoring_sigterm_after_the_grace_period(cluster, namespace):
    script = "trap '' TERM; echo ready; while true; do sleep 1; done"
    manifest = pod_yaml("stubborn", cluster.image, ["sh", "-c", script])
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    cluster.wait_pod(namespace, "stubborn", phases=("Running",))
    t0 = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", namespace, "stubborn", "--grace-period=3", "--wait=true", "--timeout=60s")
    took = time.monotonic() - t0
    assert 3 <= took < 40, took
    cluster.wait_gone(namespace, "stubborn")
