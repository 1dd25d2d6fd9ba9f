"""The process kubelet's own test API (local mode only: a real cluster has
no such handle, so these tests skip under AMLFS_TEST_CLUSTER=external)."""

from __future__ import annotations

import json
import os
import sys
import time

from .test_pods import pod_yaml


def _wait(pred, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise TimeoutError(what)


def test_node_registered_with_capacity_and_fresh_lease(cluster, process_kubelet):
    node = cluster.kubectl_json("get", "node", process_kubelet.node_name)
    alloc = node["status"]["allocatable"]
    assert alloc["nvidia.com/gpu"] == "2"
    assert alloc["cpu"] and alloc["memory"] and alloc["pods"]
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    # The node lifecycle controller takes its not-ready taint off (or never sets it): within seconds of Ready.
    _wait(
        lambda: (
            not [
                t
                for t in cluster.kubectl_json("get", "node", process_kubelet.node_name)["spec"].get("taints", [])
                if t["key"].startswith("node.kubernetes.io/not-ready")
            ]
        ),
        timeout=30,
        what="the not-ready taint removed",
    )
    lease = cluster.kubectl_json("get", "lease", "-n", "kube-node-lease", process_kubelet.node_name)
    first = lease["spec"]["renewTime"]
    _wait(
        lambda: (
            cluster.kubectl_json("get", "lease", "-n", "kube-node-lease", process_kubelet.node_name)["spec"][
                "renewTime"
            ]
            != first
        ),
        timeout=30,
        what="lease renewal",
    )


def test_fail_pod_on_demand(cluster, process_kubelet, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pod_yaml("victim", cluster.image, ["sleep", "600"]))
    cluster.wait_pod(namespace, "victim", phases=("Running",))
    process_kubelet.fail_pod(namespace, "victim", exit_code=42)
    pod = cluster.wait_pod(namespace, "victim")
    assert pod["status"]["phase"] == "Failed"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 42
    assert term["reason"] == "Error"


def test_evict_pod_like_the_kubelet(cluster, process_kubelet, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pod_yaml("evictee", cluster.image, ["sleep", "600"]))
    running = cluster.wait_pod(namespace, "evictee", phases=("Running",))
    pid = int(running["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
    assert pid in process_kubelet.pids()
    process_kubelet.evict_pod(namespace, "evictee")
    pod = cluster.wait_pod(namespace, "evictee")
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "Evicted"
    conds = {c["type"]: c for c in pod["status"]["conditions"]}
    assert conds["DisruptionTarget"]["status"] == "True"
    assert conds["DisruptionTarget"]["reason"] == "TerminationByKubelet"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert pid not in process_kubelet.pids()
    assert not os.path.exists(f"/proc/{pid}")  # killed and reaped


def test_job_replaces_evicted_pod(cluster, process_kubelet, namespace):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "trial"},
        "spec": {
            "backoffLimit": 2,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": cluster.image, "command": ["sleep", "600"]}],
                }
            },
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))

    def running_pods():
        items = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "job-name=trial")["items"]
        return [p for p in items if p["status"].get("phase") == "Running"]

    first = _wait(running_pods, what="job pod running")[0]["metadata"]["name"]
    process_kubelet.evict_pod(namespace, first)
    second = _wait(
        lambda: [p for p in running_pods() if p["metadata"]["name"] != first],
        timeout=60,
        what="replacement pod",
    )
    assert second[0]["metadata"]["name"] != first
    job = cluster.kubectl_json("get", "job", "-n", namespace, "trial")
    assert job["status"].get("failed") == 1


def test_container_log_file_and_venv_environment(cluster, process_kubelet, namespace):
    code = "import os, sys; print('PREFIX=' + sys.prefix); print('KUBECONFIG=' + os.getenv('KUBECONFIG', ''))"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=pod_yaml("py", cluster.image, ["python", "-c", code]))
    pod = cluster.wait_pod(namespace, "py")
    assert pod["status"]["phase"] == "Succeeded"
    path = process_kubelet.log_path(namespace, "py", "main")
    text = path.read_text()
    assert f"PREFIX={sys.prefix}" in text  # `python` is the venv's python
    # never the kubelet's/admin kubeconfig
    assert str(cluster.kubeconfig) not in text
    assert process_kubelet.logs(namespace, "py") == text


def test_operator_style_pod_uses_only_its_service_account(cluster, process_kubelet, namespace):
    """kubernetes.config.load_incluster_config() (mount namespaces) or the
    load_config() fallback works in a pod, with the pod SA's rights only."""
    code = (
        "from kubernetes import client, config\n"
        "try:\n"
        "    config.load_incluster_config(); how = 'incluster'\n"
        "except config.ConfigException:\n"
        "    config.load_config(); how = 'kubeconfig'\n"
        "api = client.CoreV1Api()\n"
        f"print('HOW=' + how, 'CMS=' + str(len(api.list_namespaced_config_map('{namespace}').items)))\n"
        "try:\n"
        f"    api.list_namespaced_secret('{namespace}'); print('SECRETS=allowed')\n"
        "except client.exceptions.ApiException as e:\n"
        "    print('SECRETS=' + str(e.status))\n"
    )
    rbac = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "op"}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "op"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "op"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "op"},
                "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": namespace}],
            },
        ],
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(rbac))
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=pod_yaml("op", cluster.image, ["python", "-c", code], serviceAccountName="op"),
    )
    pod = cluster.wait_pod(namespace, "op")
    out = process_kubelet.logs(namespace, "op")
    assert pod["status"]["phase"] == "Succeeded", out
    assert "SECRETS=403" in out
    assert "CMS=" in out
    if process_kubelet.mount_namespaces:
        assert "HOW=incluster" in out
    else:
        assert "HOW=kubeconfig" in out


def test_init_containers_run_first(cluster, process_kubelet, namespace):
    manifest = json.loads(
        pod_yaml(
            "withinit",
            cluster.image,
            ["sh", "-c", "cat /tmp/amlfs-test-init/ready"],
            volumes=[{"name": "work", "emptyDir": {}}],
            container={"volumeMounts": [{"name": "work", "mountPath": "/tmp/amlfs-test-init"}]},
        )
    )
    manifest["spec"]["initContainers"] = [
        {
            "name": "prep",
            "image": cluster.image,
            "command": ["sh", "-c", "echo prepared > /tmp/amlfs-test-init/ready"],
            "volumeMounts": [{"name": "work", "mountPath": "/tmp/amlfs-test-init"}],
        }
    ]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    pod = cluster.wait_pod(namespace, "withinit")
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert "prepared" in process_kubelet.logs(namespace, "withinit", "main")


def test_missing_secret_keeps_container_waiting(cluster, process_kubelet, namespace):
    manifest = pod_yaml(
        "needs-secret",
        cluster.image,
        ["sh", "-c", "echo $TOKEN"],
        container={"env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]},
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)

    def waiting_reason():
        pod = cluster.kubectl_json("get", "pod", "-n", namespace, "needs-secret")
        st = (pod["status"].get("containerStatuses") or [{}])[0].get("state", {})
        return st.get("waiting", {}).get("reason")

    _wait(lambda: waiting_reason() == "CreateContainerConfigError", what="CreateContainerConfigError")
    cluster.core().create_namespaced_secret(
        namespace, {"metadata": {"name": "later"}, "stringData": {"token": "now-here"}}
    )
    pod = cluster.wait_pod(namespace, "needs-secret")
    assert pod["status"]["phase"] == "Succeeded"
    assert "now-here" in process_kubelet.logs(namespace, "needs-secret")


def test_unknown_command_is_a_start_error(cluster, process_kubelet, namespace):
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=pod_yaml("nocmd", cluster.image, ["amlfs-no-such-binary"])
    )
    pod = cluster.wait_pod(namespace, "nocmd")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Failed"
    assert (term["exitCode"], term["reason"]) == (128, "StartError")


def test_pod_writes_to_s3_with_credentials_from_a_secret(cluster, process_kubelet, namespace, s3_server):
    """Secret -> env -> pod process -> S3 (the local S3 listens on 127.0.0.1,
    which only a process pod can reach). s3_server: tests/conftest.py."""
    s3 = s3_server
    env = s3.env()
    cluster.core().create_namespaced_secret(namespace, {"metadata": {"name": "s3"}, "stringData": env})
    code = (
        "import os, boto3\n"
        "s3 = boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL_S3'])\n"
        f"s3.put_object(Bucket='{s3.bucket}', Key='{namespace}/hello.txt', Body=b'from a pod')\n"
    )
    manifest = pod_yaml(
        "s3writer",
        cluster.image,
        ["python", "-c", code],
        container={"envFrom": [{"secretRef": {"name": "s3"}}]},
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)
    pod = cluster.wait_pod(namespace, "s3writer")
    assert pod["status"]["phase"] == "Succeeded", process_kubelet.logs(namespace, "s3writer")
    body = s3.client().get_object(Bucket=s3.bucket, Key=f"{namespace}/hello.txt")["Body"].read()
    assert body == b"from a pod"


def test_image_entrypoint_map_runs_the_trainer_from_the_venv(cluster, process_kubelet, namespace):
    """No `command`: the image's entrypoint comes from image_commands
    (amlfs-trainer:dev -> amlfs-trainer), resolved on the venv's PATH."""
    manifest = json.loads(pod_yaml("trainer-help", "amlfs-trainer:dev", []))
    del manifest["spec"]["containers"][0]["command"]
    manifest["spec"]["containers"][0]["args"] = ["--help"]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    pod = cluster.wait_pod(namespace, "trainer-help", timeout=120)
    out = process_kubelet.logs(namespace, "trainer-help")
    assert pod["status"]["phase"] == "Succeeded", out
    assert "usage" in out.lower()


def test_image_without_entrypoint_mapping_is_reported(cluster, process_kubelet, namespace):
    manifest = json.loads(pod_yaml("unmapped", "example.com/unknown:1", []))
    del manifest["spec"]["containers"][0]["command"]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))

    def waiting():
        pod = cluster.kubectl_json("get", "pod", "-n", namespace, "unmapped")
        st = (pod["status"].get("containerStatuses") or [{}])[0].get("state", {})
        return st.get("waiting")

    # what a real kubelet says when the registry has no such image: a failed pull, then back-off between pulls
    w = _wait(lambda: (waiting() or {}).get("reason") in ("ErrImagePull", "ImagePullBackOff") and waiting())
    assert "example.com/unknown:1" in w["message"] and "image_commands" in w["message"]
    _wait(lambda: (waiting() or {}).get("reason") == "ImagePullBackOff")
