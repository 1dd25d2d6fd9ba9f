"""The whole local test stack for humans (see ``tests/cluster/up``):
control plane + process kubelet + Prometheus/Pushgateway (+ S3 from
tests/support/s3.py unless --no-s3; the stack still comes up without it)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .controlplane import ControlPlane
from .kubelet import ProcessKubelet
from .services import Monitoring, start_s3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/cluster/up", description=__doc__)
    ap.add_argument("--workdir", type=Path, help="state dir (default: a temp dir, removed on exit)")
    ap.add_argument("--gpus", type=int, default=2, help="nvidia.com/gpu capacity of the node")
    ap.add_argument("--no-s3", action="store_true", help="do not start S3")
    ap.add_argument(
        "--image-command",
        action="append",
        default=[],
        metavar="IMAGE=CMD",
        help="entrypoint for containers of IMAGE without a command (repeatable); CMD is split on spaces",
    )
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    own = args.workdir is None
    base = args.workdir or Path(tempfile.mkdtemp(prefix="amlfs-up-"))
    image_commands = {"amlfs-trainer": ["amlfs-trainer"]}
    for item in args.image_command:
        image, _, cmd = item.partition("=")
        image_commands[image] = cmd.split()

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    cp = kubelet = mon = s3 = None
    try:
        cp = ControlPlane(workdir=base / "controlplane").start()
        kubelet = ProcessKubelet(
            cp.kubelet_kubeconfig,
            workdir=base / "kubelet",
            gpus=args.gpus,
            image_commands=image_commands,
            ca_file=cp.ca_file,
        ).start()
        mon = Monitoring(workdir=base / "monitoring").start()
        if not args.no_s3:
            try:
                s3 = start_s3(base / "s3")
            except Exception as e:  # the stack is still useful without S3
                print(f"# S3 not started: {e}", file=sys.stderr)
        print(f"# control plane ready in {cp.startup_seconds:.1f}s; state in {base}")
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f"export PATH={cp.bindir}:$PATH")
        print(f"export AMLFS_PROMETHEUS_URL={mon.prometheus.url}")
        print(f"export AMLFS_PUSHGATEWAY={mon.pushgateway.address}")
        if s3 is not None:
            for k, v in s3.env().items():
                print(f"export {k}={v}")
            print(f"export AMLFS_S3_BUCKET={s3.bucket}")
        print(f"# pod logs: {kubelet.workdir}/pods/<ns>_<pod>_<uid>/logs  (kubectl logs works too)")
        print("# Ctrl-C stops everything", flush=True)
        while not stop.wait(1):
            cp._check_alive()
        print("# stopping ...", flush=True)
    finally:
        for thing in (s3, mon, kubelet, cp):
            if thing is not None:
                try:
                    thing.stop()
                except Exception as e:  # keep tearing down the rest
                    print(f"# stop failed: {e}", file=sys.stderr)
        if own and not os.environ.get("AMLFS_KEEP_CLUSTER_DIR"):
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
