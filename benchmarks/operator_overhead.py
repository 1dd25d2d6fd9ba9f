"""The operator's overhead per epoch on the test control plane: from the last reward of an epoch becoming available
(pushed to the Pushgateway) to the next epoch's pods existing in the API server. Trainer pods only sleep and report
(benchmarks/fake_trainer.py), so what is measured is the operator. Target: median <= 1 s.

  python benchmarks/operator_overhead.py --epochs 10 --samples 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.controlplane import ControlPlane  # noqa: E402
from tests.cluster.kubelet import ProcessKubelet  # noqa: E402
from tests.cluster.services import Monitoring  # noqa: E402
from tests.support.s3 import S3Server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds each fake trainer sleeps")
    args = ap.parse_args()

    from kubernetes import client, config, watch

    with tempfile.TemporaryDirectory(prefix="amlfs-overhead-") as tmp:
        base = Path(tmp)
        s3 = S3Server(base / "s3").start()
        os.environ.update(s3.env())  # the process kubelet's pods inherit these (no Secret needed here)
        os.environ["AMLFS_FAKE_SLEEP"] = str(args.sleep)
        cp = ControlPlane(workdir=base / "cp").start()
        kubelet = ProcessKubelet(
            cp.kubelet_kubeconfig,
            workdir=base / "kubelet",
            gpus=8,
            ca_file=cp.ca_file,
            image_commands={"amlfs-fake-trainer": [sys.executable, str(REPO / "benchmarks" / "fake_trainer.py")]},
        )
        kubelet.start()
        mon = Monitoring(workdir=base / "mon").start()
        op = None
        try:
            kubectl = [str(cp.kubectl_path), f"--kubeconfig={cp.kubeconfig}"]
            subprocess.run(
                [*kubectl, "apply", "-f", str(REPO / "crds" / "losssearch.yaml")], check=True, capture_output=True
            )
            subprocess.run(
                [*kubectl, "wait", "--for=condition=Established", "crd/losssearches.amlfs.io"],
                check=True,
                capture_output=True,
            )
            env = dict(os.environ, KUBECONFIG=str(cp.kubeconfig), **s3.env())
            with open(base / "operator.log", "wb") as oplog:
                op = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "amlfs.controller.main",
                        "--namespace",
                        "default",
                        "--pushgateway",
                        mon.pushgateway.url,
                        "--metrics-port",
                        "0",
                        "--health-port",
                        "0",
                    ],
                    env=env,
                    stdout=oplog,
                    stderr=subprocess.STDOUT,
                )
            config.load_kube_config(str(cp.kubeconfig))
            core = client.CoreV1Api()
            first_seen: dict[int, float] = {}
            last_seen: dict[int, float] = {}
            w = watch.Watch()

            def record() -> None:
                try:
                    for ev in w.stream(core.list_namespaced_pod, "default", timeout_seconds=1800):
                        if ev["type"] == "ADDED":
                            e = int(ev["object"].metadata.labels.get("amlfs.io/epoch", "-1"))
                            now = time.time()
                            first_seen.setdefault(e, now)
                            last_seen[e] = now
                except Exception:  # the API server goes away at teardown
                    pass

            threading.Thread(target=record, daemon=True).start()
            doc = {
                "apiVersion": "amlfs.io/v1alpha1",
                "kind": "LossSearch",
                "metadata": {"name": "overhead"},
                "spec": {
                    "search": {"epochs": args.epochs, "samplesPerEpoch": args.samples},
                    "storage": {"uri": f"s3://{s3.bucket}/bench", "endpoint": s3.endpoint},
                    "trainer": {
                        "image": "amlfs-fake-trainer",
                        "metricsPort": 0,
                        "resources": {"gpu": 0, "cpu": "100m", "memory": "64Mi"},
                    },
                },
            }
            t0 = time.time()
            subprocess.run(
                [*kubectl, "apply", "-f", "-"], input=yaml.safe_dump(doc).encode(), check=True, capture_output=True
            )
            api = client.CustomObjectsApi()
            while True:
                obj = api.get_namespaced_custom_object("amlfs.io", "v1alpha1", "default", "losssearches", "overhead")
                if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    break
                if time.time() - t0 > 60 * args.epochs:
                    raise SystemExit(f"search did not finish: {obj.get('status')}")
                time.sleep(0.5)
            total = time.time() - t0
            if obj["status"]["phase"] != "Succeeded":
                raise SystemExit(f"search failed: {obj['status'].get('message')}")
            c = s3.client()
            overheads, creates = [], []
            for e in range(1, args.epochs):
                pushed = []
                for s in range(args.samples):
                    body = c.get_object(
                        Bucket=s3.bucket, Key=f"bench/default/overhead/epoch-{e - 1:04d}/sample-{s:02d}/result.json"
                    )["Body"].read()
                    pushed.append(json.loads(body).get("pushedAt", float("nan")))
                overheads.append(first_seen[e] - max(pushed))
                creates.append(last_seen[e] - max(pushed))
        finally:
            if op is not None:
                op.terminate()
                op.wait(timeout=20)
            for thing in (s3, mon, kubelet, cp):
                thing.stop()
    print(
        f"{args.epochs} epochs x {args.samples} fake samples ({args.sleep:.1f}s each), total {total:.1f}s, "
        f"phase {obj['status']['phase']}"
    )
    print(
        f"last reward -> first pod of next epoch: median {statistics.median(overheads):.3f}s, max {max(overheads):.3f}s"
    )
    print(
        f"last reward -> all {args.samples} pods of next epoch: median {statistics.median(creates):.3f}s, "
        f"max {max(creates):.3f}s"
    )
    print(f"ratio to the 1 s target: {statistics.median(creates) / 1.0:.2f}")


if __name__ == "__main__":
    main()
