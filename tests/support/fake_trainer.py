"""Trainers that only report, light enough that a machine running hundreds of them measures the operator.

A fake trainer pod starts no Python: its container runs a one-line shell that sleeps, then posts its environment
(the trainer contract's AMLFS_* variables) to one long-lived helper, `FakeTrainers`, in the test or benchmark
process. The helper does what a trainer's outcome consists of: it writes checkpoint.pt and result.json under
AMLFS_OUTPUT, pushes the reward to AMLFS_PUSHGATEWAY with the trainer's own push code, and answers; the pod then
exits 0 (or non-zero when the helper was told to fail that sample). The reward is a deterministic function of
theta, so a search's result does not depend on timing.

Use it through `spec.trainer.podTemplate` (`pod_template(url)`), so any process kubelet or node whose host has
`sh`, `sleep`, `env` and `curl` runs it; no kubelet configuration is needed. In-process (`FakeTrainers`) for
tests; as its own process for benchmarks, so that it takes no time from the process that measures:

  python -m tests.support.fake_trainer --url-file URL.txt --record PUSHES.jsonl   # S3 from the AWS_* variables
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from amlfs import storage

log = logging.getLogger(__name__)

SCRIPT = (
    'sleep "${AMLFS_FAKE_SLEEP:-1}" && '
    'env -0 | curl -sf --max-time 300 -o /dev/null -H "Content-Type: application/octet-stream" '
    '--data-binary @- "$AMLFS_FAKE_URL"'
)


def fake_reward(theta: list[float]) -> float:
    return 1.0 / (1.0 + sum((t - 0.3) ** 2 for t in theta))


def pod_template(url: str, sleep: float = 1.0) -> dict[str, Any]:
    """The `spec.trainer.podTemplate` that turns a LossSearch's trainers into fakes served by the helper at url."""
    return {
        "spec": {
            "containers": [
                {
                    "name": "trainer",
                    "command": ["/bin/sh", "-c", SCRIPT],
                    "env": [
                        {"name": "AMLFS_FAKE_URL", "value": url},
                        {"name": "AMLFS_FAKE_SLEEP", "value": str(sleep)},
                    ],
                }
            ]
        }
    }


class FakeTrainers:
    """The helper behind every fake trainer pod: an HTTP server on 127.0.0.1 (the pods share the host network).

    `s3` is a boto3 client for `s3://` outputs (file:// outputs need none). `fail` names (search, sample) pairs
    whose pods exit non-zero; `hold` names pairs whose pods stay running until `release()`.
    """

    def __init__(self, s3: Any = None, record: Path | None = None) -> None:
        self.s3 = s3
        self.record = open(record, "a", buffering=1) if record is not None else None  # noqa: SIM115 (closed in stop)
        self.pushed: dict[tuple[str, str, int, int], float] = {}  # (namespace, search, epoch, sample) -> push time
        self.calls = 0
        self.fail: set[tuple[str, int]] = set()
        self.hold: set[tuple[str, int]] = set()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FakeTrainers:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                env = dict(item.split("=", 1) for item in body.decode(errors="replace").split("\0") if "=" in item)
                try:
                    code = owner._run(env)
                except Exception:
                    log.exception("fake trainer failed")
                    code = 500
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.request_queue_size = 1024
        self._server = server
        threading.Thread(target=server.serve_forever, name="fake-trainers", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.record is not None:
            self.record.close()
            self.record = None

    def __enter__(self) -> FakeTrainers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release(self) -> None:
        """Let every held pod finish."""
        self._released.set()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def pod_template(self, sleep: float = 1.0) -> dict[str, Any]:
        return pod_template(self.url, sleep)

    # --- one sample ----------------------------------------------------------------------------------

    def _run(self, env: dict[str, str]) -> int:
        with self._lock:
            self.calls += 1
        search, epoch, sample = env["AMLFS_SEARCH"], int(env["AMLFS_EPOCH"]), int(env["AMLFS_SAMPLE"])
        if (search, sample) in self.fail:
            return 500
        if (search, sample) in self.hold:
            self._released.wait(600)
        theta = json.loads(env["AMLFS_THETA"])
        out = env["AMLFS_OUTPUT"].rstrip("/")
        ckpt = json.dumps({"epoch": epoch + 1, "theta": theta}).encode()
        self._put(f"{out}/checkpoint.pt", ckpt)
        result = {
            "status": "ok",
            "reward": fake_reward(theta),
            "theta": theta,
            "sha256": hashlib.sha256(ckpt).hexdigest(),
            "checkpoint": f"{out}/checkpoint.pt",
            "output": out,
            "epoch": epoch,
            "sample": sample,
            "timings": {"total": float(env.get("AMLFS_FAKE_SLEEP", "0"))},
        }
        self._put(f"{out}/result.json", json.dumps(result).encode())  # like the trainer: result.json, then the push
        namespace = env.get("AMLFS_NAMESPACE", "default")
        if env.get("AMLFS_PUSHGATEWAY"):
            from amlfs_trainer.metrics import push_result

            push_result(env["AMLFS_PUSHGATEWAY"], namespace, search, epoch, sample, result)
        pushed = time.time()
        with self._lock:
            self.pushed[(namespace, search, epoch, sample)] = pushed
            if self.record is not None:
                self.record.write(json.dumps([namespace, search, epoch, sample, pushed]) + "\n")
        return 200

    def _put(self, uri: str, data: bytes) -> None:
        loc = storage.parse(uri)
        if loc.scheme == "s3":
            assert self.s3 is not None, "an s3:// output needs FakeTrainers(s3=client)"
            self.s3.put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        else:
            storage.write_bytes(uri, data)


def read_record(path: Path) -> dict[tuple[str, str, int, int], float]:
    """The push times written by a helper started with --record."""
    out: dict[tuple[str, str, int, int], float] = {}
    for line in path.read_text().splitlines():
        namespace, search, epoch, sample, pushed = json.loads(line)
        out[(namespace, search, epoch, sample)] = pushed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url-file", type=Path, required=True, help="where to write the helper's URL once it serves")
    ap.add_argument("--record", type=Path, help="append one JSON line per push: [namespace, search, epoch, sample, t]")
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with FakeTrainers(s3=storage.s3_client(), record=args.record) as fakes:
        args.url_file.write_text(fakes.url)
        stop.wait()


if __name__ == "__main__":
    main()
