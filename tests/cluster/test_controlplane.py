"""The control plane itself: versions, helm, readiness, teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .controlplane import ControlPlane

HERE = Path(__file__).resolve().parent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_kubectl_and_server_report_real_versions(cluster):
    v = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    server = v["serverVersion"]["gitVersion"]
    assert server.startswith("v1.")
    if cluster.mode == "local":
        pinned = next(
            line.split()[1]
            for line in (HERE / "go" / "go.mod").read_text().splitlines()
            if line.strip().startswith("k8s.io/kubernetes ")
        )
        assert server == pinned
        assert v["clientVersion"]["gitVersion"] == pinned
        assert v["serverVersion"]["gitTreeState"] == "clean"


def test_helm_installs_a_chart(cluster, namespace, tmp_path):
    helm = cluster.helm_bin
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: {{ .Release.Name }}-cm
        data:
          answer: {{ .Values.answer | quote }}
        """)
    )
    (chart / "values.yaml").write_text("answer: 41\n")
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }
    out = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.startswith("v3.")
    subprocess.run(
        [str(helm), "install", "p1", str(chart), "-n", namespace, "--set", "answer=42", "--wait"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    cm = cluster.kubectl_json("get", "configmap", "-n", namespace, "p1-cm")
    assert cm["data"]["answer"] == "42"


@pytest.fixture
def local_only(cluster):
    if cluster.mode != "local":
        pytest.skip("starts its own control plane: local mode only")


def test_second_control_plane_ready_and_stopped_cleanly(local_only, tmp_path):
    """Readiness time with warm binaries, and no stray process after stop()."""
    cp = ControlPlane(workdir=tmp_path / "cp2", scheduler=False)
    cp.start()
    try:
        pids = cp.pids()
        assert len(pids) == 3
        print(f"\n[controlplane] ready in {cp.startup_seconds:.1f}s", file=sys.stderr)
        assert cp.startup_seconds < 60
        r = cp.kubectl("get", "--raw", "/readyz")
        assert r.stdout.strip() == "ok"
    finally:
        cp.stop()
    assert not [p for p in pids if _alive(p)]


def test_stack_dies_with_a_killed_parent(local_only, tmp_path):
    """SIGKILL of the owning Python process (no atexit, no finalizers) still
    takes etcd/apiserver/controller-manager and the pods' processes down
    (PR_SET_PDEATHSIG). Also runs the kubelet's own binder (no scheduler)."""
    script = textwrap.dedent(f"""\
        import json, subprocess, sys, time
        sys.path.insert(0, {str(HERE.parent)!r})
        from pathlib import Path
        from cluster.controlplane import ControlPlane
        from cluster.kubelet import ProcessKubelet
        base = Path({str(tmp_path)!r})
        cp = ControlPlane(workdir=base / "cp", scheduler=False).start()
        kubelet = ProcessKubelet(cp.kubelet_kubeconfig, workdir=base / "kubelet", bind_pods=True).start()
        pod = {{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "orphan"}},
               "spec": {{"containers": [{{"name": "c", "image": "x", "command": ["sleep", "600"]}}]}}}}
        cp.kubectl("apply", "-f", "-", input=json.dumps(pod))
        deadline = time.monotonic() + 60
        while not kubelet.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        print(json.dumps([cp.pids(), kubelet.pids()]), flush=True)
        time.sleep(600)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        cp_pids, pod_pids = json.loads(proc.stdout.readline())
        assert len(cp_pids) == 3 and len(pod_pids) == 1
        pids = cp_pids + pod_pids
        assert all(_alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
