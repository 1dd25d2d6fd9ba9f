"""The Helm chart (helm/amlfs) against the real control plane: lint, schema, server-side dry-run, least-privilege
RBAC (`kubectl auth can-i` as the chart's ServiceAccount), and an end-to-end search driven by the operator the
chart deploys — a Pod (of the process kubelet, or the operator image in a container on kind) that authenticates
with its ServiceAccount token only — with every PromQL expression of the Grafana dashboards run against the real
Prometheus afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support.s3 import free_port

from .controlplane import ensure_binaries
from .incluster import cluster_mode
from .test_operator import EXAMPLE, apply, search_pods, setup_namespace

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "amlfs"
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


@pytest.fixture(scope="module")
def helm_bin() -> str:
    """helm without starting a cluster (lint/template need none): the build of tests/cluster/go/helm, or on an
    external cluster the helm on PATH when there is one (the kind workflow installs the same version)."""
    if cluster_mode() == "external" and shutil.which("helm"):
        return shutil.which("helm")
    return str(ensure_binaries() / "helm")


def helm(helm_bin: str, *args: str, check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [helm_bin, *args] + ([f"--kubeconfig={kubeconfig}"] if kubeconfig else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def render(helm_bin: str, *sets: str, namespace: str = "amlfs-system", show: list[str] | None = None) -> list[dict]:
    args = ["template", "amlfs", str(CHART), "-n", namespace]
    for s in sets:
        args += ["--set", s]
    for s in show or []:
        args += ["--show-only", s]
    return [d for d in yaml.safe_load_all(helm(helm_bin, *args).stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


# --------------------------------------------------------------------------------------------------------------
# without a cluster


@pytest.mark.parametrize(
    "sets",
    [
        [],
        ["watchNamespace=team-a"],
        ["metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true", "storage.existingSecret=s3"],
        ["rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops", "dashboards.enabled=false"],
    ],
    ids=["defaults", "namespaced", "monitors", "bring-your-own"],
)
def test_helm_lint_strict(helm_bin, sets) -> None:
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = helm(helm_bin, *args)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("operator.metricsPort=0", "/operator/metricsPort"),
        ("pushgateway.url=pushgateway:9091", "/pushgateway/url"),
        ("watchNamespace=Team_A", "/watchNamespace"),
        ("storage.defaultUri=bucket/prefix", "/storage/defaultUri"),
        ("operator.logFormat=yaml", "/operator/logFormat"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("metrics.serviceMonitor.interval=often", "/metrics/serviceMonitor/interval"),
        ("replicas=2", "additional properties 'replicas' not allowed"),
        ("runAsUser=0", "/runAsUser"),
    ],
)
def test_values_schema_rejects_bad_values(helm_bin, value, message) -> None:
    for cmd in (["template", "amlfs", str(CHART)], ["lint", "--strict", str(CHART)]):
        proc = helm(helm_bin, *cmd, "--set", value, check=False)
        assert proc.returncode != 0, f"helm {cmd[0]} accepted {value}"
        out = proc.stderr + proc.stdout
        assert "values don't meet the specifications of the schema" in out or message in out, out
        assert message in out, out


def test_rbac_is_exactly_what_the_operator_does(helm_bin) -> None:
    """No Secrets, no wildcards; namespaced mode keeps everything but CRD discovery inside the namespace."""
    expected_ns = {
        ("amlfs.io", "losssearches"): {"get", "list", "watch", "patch"},
        ("amlfs.io", "losssearches/status"): {"patch"},
        ("", "pods"): {"list", "watch", "create", "delete"},
        ("", "events"): {"create"},
    }
    crds = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}

    def rules(doc: dict) -> dict[tuple[str, str], set[str]]:
        out: dict[tuple[str, str], set[str]] = {}
        for r in doc["rules"]:
            assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
            for g in r["apiGroups"]:
                for res in r["resources"]:
                    out.setdefault((g, res), set()).update(r["verbs"])
        return out

    cw = by_kind(render(helm_bin, show=["templates/rbac.yaml"]))
    assert set(cw) == {"ClusterRole", "ClusterRoleBinding"}
    assert rules(cw["ClusterRole"][0]) == {**expected_ns, **crds}
    ns = by_kind(render(helm_bin, "watchNamespace=team-a", show=["templates/rbac.yaml"]))
    assert set(ns) == {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    assert ns["Role"][0]["metadata"]["namespace"] == "team-a"
    assert rules(ns["Role"][0]) == expected_ns
    assert rules(ns["ClusterRole"][0]) == crds
    # OwnerReferencesPermissionEnforcement clusters (OpenShift): update on the finalizers subresource, nothing else
    openshift = by_kind(
        render(helm_bin, "rbac.ownerReferencesPermissionEnforcement=true", show=["templates/rbac.yaml"])
    )
    assert rules(openshift["ClusterRole"][0]) == {
        **expected_ns,
        **crds,
        ("amlfs.io", "losssearches/finalizers"): {"update"},
    }
    for docs in (cw, ns):
        for b in docs.get("RoleBinding", []) + docs["ClusterRoleBinding"]:
            assert b["subjects"] == [{"kind": "ServiceAccount", "name": "amlfs", "namespace": "amlfs-system"}]


def test_deployment_shape(helm_bin) -> None:
    docs = by_kind(
        render(
            helm_bin,
            "watchNamespace=team-a",
            "storage.existingSecret=s3creds",
            "storage.endpoint=http://minio:9000",
            "storage.defaultUri=s3://amlfs/searches",
            "pushgateway.url=http://pg:9091",
            "pushgateway.podUrl=http://pg.monitoring:9091",
        )
    )
    dep = docs["Deployment"][0]
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"][0]["metadata"]["name"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (c,) = pod["containers"]
    assert c["image"] == "amlfs-operator:0.1.0" and "command" not in c  # the image's ENTRYPOINT
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"] and not sc["allowPrivilegeEscalation"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert c["resources"]["limits"] and c["resources"]["requests"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["AMLFS_NAMESPACE"] == "team-a"
    assert env["AMLFS_PUSHGATEWAY"] == "http://pg:9091" and env["AMLFS_POD_PUSHGATEWAY"] == "http://pg.monitoring:9091"
    assert env["AMLFS_DEFAULT_STORAGE"] == "s3://amlfs/searches"
    assert env["AMLFS_POD_S3_ENDPOINT"] == env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env["HOME"] == "/tmp" and env["AMLFS_POD_RUN_AS_USER"] == "1000"
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/tmp"]
    # cluster-wide: no AMLFS_NAMESPACE
    cw = by_kind(render(helm_bin, show=["templates/deployment.yaml"]))["Deployment"][0]
    assert "AMLFS_NAMESPACE" not in {e["name"] for e in cw["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_run_as_user_null_leaves_the_uid_to_the_platform(helm_bin, monkeypatch) -> None:
    """`runAsUser=null` (OpenShift's restricted-v2 assigns the uid): neither the operator pod nor, through
    AMLFS_POD_RUN_AS_USER, the trainer pods set runAsUser/runAsGroup/fsGroup; both keep runAsNonRoot."""
    from amlfs.controller.main import parser
    from amlfs.controller.pods import trainer_pod
    from amlfs.controller.reconcile import Settings
    from amlfs.core import StartSample
    from amlfs.spec import LossSearchSpec

    def rendered(*sets: str) -> tuple[dict, str]:
        (dep,) = render(helm_bin, *sets, show=["templates/deployment.yaml"])
        pod = dep["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        return pod["securityContext"], env["AMLFS_POD_RUN_AS_USER"]

    def trainer_security(env_value: str) -> dict:
        monkeypatch.setenv("AMLFS_POD_RUN_AS_USER", env_value)
        settings = Settings(run_as_user=parser().parse_args([]).pod_run_as_user)
        spec = LossSearchSpec.model_validate(yaml.safe_load(EXAMPLE.read_text())["spec"])
        start = StartSample(0, 0, 0, [0.0], None, "s3://b/x")
        return trainer_pod(spec, "s", "ns", start, settings.pods())["spec"]["securityContext"]

    restricted = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    ctx, env_value = rendered("runAsUser=null")
    assert ctx == restricted and env_value == ""
    assert trainer_security(env_value) == restricted
    ctx, env_value = rendered("runAsUser=4242")
    assert ctx == {**restricted, "runAsUser": 4242, "runAsGroup": 4242, "fsGroup": 4242} and env_value == "4242"
    assert trainer_security(env_value) == ctx
    # keys set in podSecurityContext win over the ids from runAsUser
    ctx, _ = rendered("podSecurityContext.fsGroup=2000")
    assert ctx["fsGroup"] == 2000 and ctx["runAsUser"] == 1000


def test_monitors_select_what_the_operator_creates(helm_bin) -> None:
    """ServiceMonitor/PodMonitor (monitoring.coreos.com/v1; their CRDs are not available offline) checked against
    the Service the chart renders and a trainer pod built by the operator's own code."""
    from amlfs.controller.pods import PodSettings, trainer_pod
    from amlfs.core import StartSample
    from amlfs.spec import LossSearchSpec

    docs = by_kind(
        render(
            helm_bin,
            "metrics.serviceMonitor.enabled=true",
            "metrics.podMonitor.enabled=true",
            "metrics.serviceMonitor.labels.release=prom",
            "watchNamespace=team-a",
        )
    )
    (sm,), (pm,), (svc,) = docs["ServiceMonitor"], docs["PodMonitor"], docs["Service"]
    dep = docs["Deployment"][0]
    for m in (sm, pm):
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(m["spec"]) <= {"selector", "namespaceSelector", "endpoints", "podMetricsEndpoints", "jobLabel"}
    assert sm["metadata"]["labels"]["release"] == "prom"
    # ServiceMonitor -> the metrics Service -> the operator pod
    sel = sm["spec"]["selector"]["matchLabels"]
    assert sel.items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["amlfs-system"]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"
    assert ep["honorLabels"] is True  # keep the searches' own `namespace` label
    assert re.fullmatch(r"\d+(ms|s|m|h)", ep["interval"])
    # PodMonitor -> the trainer pods the operator makes, not the operator itself
    raw = yaml.safe_load(EXAMPLE.read_text())["spec"]
    raw["trainer"]["metricsPort"] = 9400  # live /metrics on (the example turns them off)
    spec = LossSearchSpec.model_validate(raw)
    pod = trainer_pod(spec, "s", "team-a", StartSample(0, 0, 0, [0.0], None, "s3://b/x"), PodSettings())
    psel = pm["spec"]["selector"]["matchLabels"]
    assert psel.items() <= pod["metadata"]["labels"].items()
    assert not psel.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    (pep,) = pm["spec"]["podMetricsEndpoints"]
    assert pep["port"] in {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    cw = by_kind(render(helm_bin, "metrics.podMonitor.enabled=true", show=["templates/podmonitor.yaml"]))
    assert cw["PodMonitor"][0]["spec"]["namespaceSelector"] == {"any": True}
    # the servicemonitor needs the service
    proc = helm(
        helm_bin,
        "template",
        "x",
        str(CHART),
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.service.enabled=false",
        check=False,
    )
    assert proc.returncode != 0 and "needs metrics.service.enabled" in proc.stderr


def test_dashboards_configmap_holds_the_dashboards(helm_bin) -> None:
    (cm,) = render(helm_bin, show=["templates/dashboards-configmap.yaml"])
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(cm["data"]) == [p.name for p in DASHBOARDS]
    for p in DASHBOARDS:
        assert json.loads(cm["data"][p.name]) == json.loads(p.read_text())


# --------------------------------------------------------------------------------------------------------------
# on the API server


def _template_to_server(cluster, namespace: str, *sets: str) -> str:
    args = ["template", "amlfs", str(CHART), "-n", namespace, "--include-crds"]
    for s in sets:
        args += ["--set", s]
    manifest = helm(cluster.helm_bin, *args).stdout
    return cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest).stdout


def test_rendered_chart_is_accepted_by_the_api_server(cluster, namespace) -> None:
    cluster.kubectl("label", "namespace", namespace, RESTRICTED)
    watched = f"w-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", watched)
    try:
        out = _template_to_server(cluster, namespace, "storage.existingSecret=s3", "pushgateway.url=http://pg:9091")
        for obj in (
            "serviceaccount/amlfs",
            "deployment.apps/amlfs",
            "service/amlfs-metrics",
            f"clusterrole.rbac.authorization.k8s.io/amlfs-{namespace}",
            "configmap/amlfs-dashboards",
        ):
            assert obj in out and "(server dry run)" in out, out
        out = _template_to_server(cluster, namespace, "runAsUser=null")  # the uid left to the platform
        assert "deployment.apps/amlfs" in out and "(server dry run)" in out, out
        out = _template_to_server(cluster, namespace, f"watchNamespace={watched}")
        assert "role.rbac.authorization.k8s.io/amlfs" in out and "rolebinding.rbac.authorization.k8s.io/amlfs" in out
        # the dry run is real: a broken manifest is refused by the server
        bad = helm(
            cluster.helm_bin,
            "template",
            "amlfs",
            str(CHART),
            "-n",
            namespace,
            "--show-only",
            "templates/deployment.yaml",
        ).stdout.replace("Recreate", "Sometimes")
        proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=bad, check=False)
        assert proc.returncode != 0 and "Sometimes" in proc.stderr
    finally:
        cluster.kubectl("delete", "namespace", watched, "--wait=false", check=False)


def test_trainer_pods_without_a_uid_pass_the_restricted_pod_security_standard(cluster, namespace) -> None:
    """A trainer pod as the operator creates it with AMLFS_POD_RUN_AS_USER="" (no runAsUser/runAsGroup/fsGroup) is
    admitted in a namespace that enforces the restricted Pod Security Standard; without runAsNonRoot it is not."""
    from amlfs.controller.pods import PodSettings, trainer_pod
    from amlfs.core import StartSample
    from amlfs.spec import LossSearchSpec

    cluster.kubectl("label", "namespace", namespace, RESTRICTED)
    spec = LossSearchSpec.model_validate(yaml.safe_load(EXAMPLE.read_text())["spec"])
    start = StartSample(0, 0, 0, [0.0], None, "s3://b/x")
    pod = trainer_pod(spec, "s", namespace, start, PodSettings(run_as_user=None))
    assert "runAsUser" not in pod["spec"]["securityContext"] and "fsGroup" not in pod["spec"]["securityContext"]
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(pod)).stdout
    assert f"pod/{pod['metadata']['name']}" in out and "(server dry run)" in out, out
    pod["spec"]["securityContext"]["runAsNonRoot"] = False
    proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert proc.returncode != 0 and "runAsNonRoot" in proc.stderr, proc.stderr


def can_i(cluster, sa: str, verb: str, resource: str, namespace: str | None = None, *extra: str) -> bool:
    """`kubectl auth can-i` as `sa`; "res/sub" asks for the subresource (not a resource named "sub")."""
    resource, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as={sa}", *extra]
    if sub:
        args.append(f"--subresource={sub}")
    if namespace:
        args.append(f"-n={namespace}")
    proc = cluster.kubectl(*args, check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stderr
    assert "doesn't have a resource type" not in proc.stderr, proc.stderr
    return proc.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def chart_crd(cluster) -> str:
    """The chart's CRD (helm/amlfs/crds/), as `helm install` would create it."""
    cluster.kubectl("apply", "-f", str(CHART / "crds" / "losssearch.yaml"))
    cluster.wait_crd("losssearches.amlfs.io")
    return "losssearches.amlfs.io"


def _apply_rbac_only(cluster, release_ns: str, *sets: str) -> None:
    args = [
        "template",
        "amlfs",
        str(CHART),
        "-n",
        release_ns,
        "--show-only",
        "templates/rbac.yaml",
        "--show-only",
        "templates/serviceaccount.yaml",
    ]
    for s in sets:
        args += ["--set", s]
    cluster.kubectl("apply", "-f", "-", input=helm(cluster.helm_bin, *args).stdout)


ALLOWED = [
    ("get", "losssearches.amlfs.io"),
    ("list", "losssearches.amlfs.io"),
    ("watch", "losssearches.amlfs.io"),
    ("patch", "losssearches.amlfs.io"),
    ("patch", "losssearches.amlfs.io/status"),
    ("list", "pods"),
    ("watch", "pods"),
    ("create", "pods"),
    ("delete", "pods"),
    ("create", "events"),
]
DENIED = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "losssearches.amlfs.io"),
    ("delete", "losssearches.amlfs.io"),
    ("update", "losssearches.amlfs.io"),
    ("get", "pods"),
    ("patch", "pods"),
    ("create", "pods/exec"),
    ("get", "pods/log"),
    ("get", "configmaps"),
    ("create", "deployments.apps"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("create", "serviceaccounts/token"),
    ("update", "losssearches.amlfs.io/status"),
    ("update", "losssearches.amlfs.io/finalizers"),
    ("delete", "events"),
]


def test_rbac_least_privilege_namespaced(cluster, chart_crd, namespace) -> None:
    watched, other = f"w-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    for ns in (watched, other):
        cluster.kubectl("create", "namespace", ns)
    try:
        _apply_rbac_only(cluster, namespace, f"watchNamespace={watched}")
        sa = f"system:serviceaccount:{namespace}:amlfs"
        for verb, res in ALLOWED:
            assert can_i(cluster, sa, verb, res, watched), (verb, res, watched)
            assert not can_i(cluster, sa, verb, res, other), (verb, res, other)
            assert not can_i(cluster, sa, verb, res, namespace), (verb, res, namespace)  # not even its own
        for verb, res in DENIED:
            for ns in (watched, other, namespace):
                assert not can_i(cluster, sa, verb, res, ns), (verb, res, ns)
        assert can_i(cluster, sa, "list", "customresourcedefinitions.apiextensions.k8s.io")
        assert can_i(cluster, sa, "watch", "customresourcedefinitions.apiextensions.k8s.io")
        for verb in ("get", "create", "delete", "update", "patch"):
            assert not can_i(cluster, sa, verb, "customresourcedefinitions.apiextensions.k8s.io"), verb
        assert not can_i(cluster, sa, "list", "losssearches.amlfs.io", None, "--all-namespaces")
        assert not can_i(cluster, sa, "list", "namespaces")
        assert not can_i(cluster, sa, "list", "nodes")
    finally:
        for ns in (watched, other):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        cluster.kubectl("delete", "clusterrole,clusterrolebinding", f"amlfs-{namespace}-crds", check=False)


def test_rbac_least_privilege_cluster_wide(cluster, chart_crd, namespace) -> None:
    _apply_rbac_only(cluster, namespace)
    sa = f"system:serviceaccount:{namespace}:amlfs"
    try:
        for verb, res in ALLOWED:
            assert can_i(cluster, sa, verb, res, "default"), (verb, res)
        assert can_i(cluster, sa, "list", "losssearches.amlfs.io", None, "--all-namespaces")
        assert can_i(cluster, sa, "watch", "pods", None, "--all-namespaces")
        for verb, res in DENIED:
            assert not can_i(cluster, sa, verb, res, "default"), (verb, res)
            assert not can_i(cluster, sa, verb, res, None, "--all-namespaces"), (verb, res)
        assert can_i(cluster, sa, "list", "customresourcedefinitions.apiextensions.k8s.io")
        for verb in ("get", "create", "delete", "update", "patch"):
            assert not can_i(cluster, sa, verb, "customresourcedefinitions.apiextensions.k8s.io"), verb
        for verb, res in (
            ("list", "namespaces"),
            ("list", "nodes"),
            ("create", "namespaces"),
            ("create", "clusterroles.rbac.authorization.k8s.io"),
        ):
            assert not can_i(cluster, sa, verb, res), (verb, res)
    finally:
        cluster.kubectl("delete", "clusterrole,clusterrolebinding", f"amlfs-{namespace}", check=False)


# --------------------------------------------------------------------------------------------------------------
# end to end: `helm install`, the operator as a Pod with its ServiceAccount only, a real search, the dashboards


def prom_range(prometheus, expr: str, start: float, end: float, step: float = 2.0) -> list[dict]:
    """A range query, as Grafana's graph panels issue them."""
    q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    try:
        with urllib.request.urlopen(f"{prometheus.url}/api/v1/query_range?{q}", timeout=30) as r:
            body = json.load(r)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"prometheus refused {expr!r}: {exc.read()[:500]!r}") from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_http(url: str, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_running(cluster, namespace: str, pod: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    phase = None
    while time.monotonic() < deadline:
        r = cluster.kubectl("get", "pod", pod, "-n", namespace, "-o", "jsonpath={.status.phase}", check=False)
        phase = r.stdout.strip() if r.returncode == 0 else None
        if phase == "Running":
            return
        time.sleep(0.3)
    raise AssertionError(f"pod {namespace}/{pod} not Running after {timeout}s: {phase}")


def pod_environ(cluster, namespace: str, pod: str) -> dict[str, str]:
    """The live process environment of a pod's (only) container: read from /proc on this host for the process
    kubelet's pods, from the container's PID 1 (its entrypoint) on a real cluster."""
    if cluster.kubelet is None:
        raw = cluster.kubectl("exec", "-n", namespace, pod, "--", "cat", "/proc/1/environ").stdout
        return dict(x.split("=", 1) for x in raw.split("\0") if "=" in x)
    for pid in cluster.kubelet.pids():
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        env = dict(x.split("=", 1) for x in raw.decode(errors="replace").split("\0") if "=" in x)
        if env.get("HOSTNAME") == pod:
            return env
    raise AssertionError(f"no running process of pod {pod}")


def wait_healthz(cluster, namespace: str, pod: str, port: int, timeout: float = 120) -> None:
    """The liveness probe's endpoint answers 200: on this host for the process kubelet's pods (which share its
    network), through the API server's pod proxy on a real cluster."""
    if cluster.kubelet is not None:
        assert wait_http(f"http://127.0.0.1:{port}/healthz", timeout) == 200
        return
    deadline = time.monotonic() + timeout
    while True:
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/healthz"
        proc = cluster.kubectl("get", "--raw", path, check=False)
        if proc.returncode == 0:
            return
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(1)


@pytest.fixture
def operator_image(cluster) -> tuple[str, str]:
    """(image.repository, image.tag) of the operator: on a real cluster the image built from ./Dockerfile and
    loaded into it ($AMLFS_TEST_OPERATOR_IMAGE, default amlfs-operator:dev); on the process kubelet the local
    `amlfs-operator` console script is the image's entrypoint (tag: the chart's default)."""
    if cluster.kubelet is not None:
        cluster.kubelet.image_commands.setdefault("amlfs-operator", ["amlfs-operator"])
        return "amlfs-operator", ""
    image = os.environ.get("AMLFS_TEST_OPERATOR_IMAGE", "amlfs-operator:dev")
    repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return repository, tag


def test_helm_install_runs_a_search_with_least_privilege_and_the_dashboards_show_it(
    cluster, namespace, operator_image, monitoring, s3_server, tmp_path
):
    """Locally the operator Pod is a process of the process kubelet and Prometheus scrapes the ports registered
    here; on a real cluster (kind) it is the operator image in a container, and the in-cluster Prometheus finds
    the operator and trainer pods itself. Either way the chart gets the in-cluster addresses of S3 and the
    Pushgateway (``pod_endpoint``/``pod_url``), since the operator runs in a Pod."""
    release_ns, search_ns, name = namespace, f"s-{uuid.uuid4().hex[:8]}", "helm-digits"
    local = cluster.kubelet is not None
    cluster.kubectl("label", "namespace", release_ns, RESTRICTED)
    cluster.kubectl("create", "namespace", search_ns)
    cluster.kubectl("label", "namespace", search_ns, RESTRICTED)
    setup_namespace(cluster, release_ns, s3_server)  # the operator's own S3 credentials (secretKeyRef)
    setup_namespace(cluster, search_ns, s3_server)  # the trainer pods' (spec.storage.secretName)
    # the process kubelet's pods share this host's network: free ports; in containers the chart's defaults
    metrics_port, health_port, trainer_port = (free_port(), free_port(), free_port()) if local else (8080, 8081, 9400)
    prom = monitoring.prometheus
    targets = []
    if local:
        targets = [
            prom.add_target(f"127.0.0.1:{metrics_port}", labels={"job": "amlfs-operator"}),
            prom.add_target(f"127.0.0.1:{trainer_port}", labels={"job": "amlfs-trainers", "namespace": search_ns}),
        ]
    repository, tag = operator_image
    values = {
        "image.repository": repository,
        "watchNamespace": search_ns,
        "pushgateway.url": monitoring.pushgateway.pod_url,
        "storage.defaultUri": f"s3://{s3_server.bucket}/helm",
        "storage.endpoint": s3_server.pod_endpoint,
        "storage.region": "us-east-1",
        "storage.existingSecret": "amlfs-s3",
        "operator.metricsPort": str(metrics_port),
        "operator.healthPort": str(health_port),
        "operator.interval": "2",
        "operator.rewardTimeout": "20",
        "operator.logFormat": "plain",
    }
    if tag:
        values["image.tag"] = tag
    strings = ("storage.", "image.tag")
    sets = [a for k, v in values.items() for a in ("--set-string" if k.startswith(strings) else "--set", f"{k}={v}")]
    t0 = time.time()
    try:
        installed = helm(
            cluster.helm_bin,
            "install",
            "amlfs",
            str(CHART),
            "-n",
            release_ns,
            *sets,
            "--wait",
            "--timeout=180s",
            kubeconfig=cluster.kubeconfig,
        )
        assert "STATUS: deployed" in installed.stdout and f"watching namespace {search_ns}." in installed.stdout
        (pod,) = cluster.kubectl_json("get", "pods", "-n", release_ns, "-l", "app.kubernetes.io/component=operator")[
            "items"
        ]
        op_pod = pod["metadata"]["name"]
        # the operator Pod authenticates as the chart's ServiceAccount, and with nothing else
        assert pod["spec"]["serviceAccountName"] == "amlfs"
        assert any((v.get("projected") or {}).get("sources") for v in pod["spec"]["volumes"]), "no SA token volume"
        env = pod_environ(cluster, release_ns, op_pod)
        assert "KUBECONFIG" not in env and env["HOME"] == "/tmp"
        assert env["AMLFS_NAMESPACE"] == search_ns and env["AWS_ACCESS_KEY_ID"] == s3_server.access_key
        wait_healthz(cluster, release_ns, op_pod, health_port)

        doc = yaml.safe_load(EXAMPLE.read_text())
        doc["metadata"]["name"] = name
        doc["spec"]["search"].update(epochs=2, samplesPerEpoch=2)
        doc["spec"]["storage"] = {"secretName": "amlfs-s3"}  # bucket and endpoint: the chart's defaults
        doc["spec"]["trainer"]["metricsPort"] = trainer_port
        doc["spec"]["trainer"]["resources"]["gpu"] = 0  # the test nodes have no GPU
        apply(cluster, search_ns, doc)
        # one trainer crashes once: the operator retries it, and the dashboards' failure panels have data
        wait_running(cluster, search_ns, f"{name}-e0-s1", timeout=180)
        cluster.crash_trainer(search_ns, f"{name}-e0-s1")
        deadline = time.monotonic() + 600
        st: dict = {}
        while time.monotonic() < deadline:
            st = cluster.kubectl_json("get", "losssearch", name, "-n", search_ns).get("status") or {}
            if st.get("phase") in ("Succeeded", "Failed"):
                break
            time.sleep(1)
        op_log = cluster.kubectl("logs", "-n", release_ns, op_pod).stdout
        assert st.get("phase") == "Succeeded", (st, op_log[-4000:])
        assert st["epoch"] == 2 and len(st["history"]) == 2
        uid = cluster.kubectl_json("get", "losssearch", name, "-n", search_ns)["metadata"]["uid"]
        assert st["storageRoot"] == f"s3://{s3_server.bucket}/helm/{search_ns}/{name}/{uid}"
        body = s3_server.client().get_object(
            Bucket=s3_server.bucket, Key=f"helm/{search_ns}/{name}/{uid}/history.jsonl"
        )
        hist = [json.loads(line) for line in body["Body"].read().decode().splitlines()]
        assert [h["epoch"] for h in hist] == [0, 1] and all(r is not None for h in hist for r in h["rewards"])
        events = cluster.kubectl_json(
            "get", "events", "-n", search_ns, "--field-selector", f"involvedObject.name={name}"
        )
        reasons = {e["reason"] for e in events["items"]}
        assert {"EpochCompleted", "SampleRetried", "SearchSucceeded"} <= reasons, reasons
        deadline = time.monotonic() + 60
        while search_pods(cluster, search_ns, name) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert search_pods(cluster, search_ns, name) == []
        # nothing it does is forbidden; only kopf's optional namespace listing is, by design
        forbidden = [ln for ln in op_log.splitlines() if re.search(r"\b403\b|[Ff]orbidden|permission", ln)]
        assert all("namespaces" in ln for ln in forbidden), forbidden

        prom.wait_for(
            f'amlfs_operator_phase{{namespace="{search_ns}", search="{name}", phase="Succeeded"}} == 1', timeout=60
        )
        time.sleep(3)
        check_dashboards(prom, t0, time.time(), {"namespace": search_ns, "search": name, "job": "amlfs-operator"})
    finally:
        for t in targets:
            prom.remove_target(t)
        helm(
            cluster.helm_bin,
            "uninstall",
            "amlfs",
            "-n",
            release_ns,
            "--wait",
            check=False,
            kubeconfig=cluster.kubeconfig,
        )
        cluster.kubectl("delete", "namespace", search_ns, "--wait=false", check=False)


def check_dashboards(prom, start: float, end: float, want: dict[str, str]) -> None:
    """Every variable query resolves to (at least) the wanted value; every panel query, with the variables
    substituted as Grafana does, returns data — range queries for graphs, instant ones where the panel asks."""
    rng = f"{int(end - start) + 30}s"
    checked = 0
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        subst = {"__rate_interval": "15s", "__interval": "2s", "__range": rng}

        def fill(expr: str, subst=subst) -> str:
            return re.sub(r"\$(\w+)", lambda m: subst[m.group(1)], expr)

        for v in board["templating"]["list"]:
            if v["type"] != "query":
                continue
            sel, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"]).groups()
            series = prom_range(prom, f"group by ({label}) ({fill(sel)})", start, end)
            values = {s["metric"].get(label) for s in series}
            assert want[v["name"]] in values, (path.name, v["name"], values)
            subst[v["name"]] = want[v["name"]]
        for p in board["panels"]:
            for t in p.get("targets", []):
                expr = fill(t["expr"])
                result = prom.query(expr) if t.get("instant") else prom_range(prom, expr, start, end)
                assert result, f"{path.name}: panel {p['title']!r}: {expr} returned no data"
                checked += 1
    assert checked >= 20
