"""A trainer that only sleeps and reports, for measuring the operator's own overhead.

It honours the trainer CLI contract (AMLFS_* environment, result.json + checkpoint.pt under AMLFS_OUTPUT, reward
pushed to AMLFS_PUSHGATEWAY) without torch: the reward is a deterministic function of theta, and result.json
records when the reward was pushed (`pushedAt`, epoch seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

from amlfs import storage
from amlfs_trainer.metrics import push_result


def main() -> int:
    e = os.environ
    theta = json.loads(e["AMLFS_THETA"])
    time.sleep(float(e.get("AMLFS_FAKE_SLEEP", "1")))
    out = e["AMLFS_OUTPUT"]
    ckpt = json.dumps({"epoch": int(e["AMLFS_EPOCH"]) + 1, "theta": theta}).encode()
    storage.write_bytes(f"{out}/checkpoint.pt", ckpt)
    reward = 1.0 / (1.0 + sum((t - 0.3) ** 2 for t in theta))
    result = {
        "status": "ok",
        "reward": reward,
        "theta": theta,
        "sha256": hashlib.sha256(ckpt).hexdigest(),
        "checkpoint": f"{out}/checkpoint.pt",
        "epoch": int(e["AMLFS_EPOCH"]),
        "sample": int(e["AMLFS_SAMPLE"]),
        "timings": {"total": 0.0},
    }
    if e.get("AMLFS_PUSHGATEWAY"):
        push_result(
            e["AMLFS_PUSHGATEWAY"],
            e.get("AMLFS_NAMESPACE", "default"),
            e["AMLFS_SEARCH"],
            int(e["AMLFS_EPOCH"]),
            int(e["AMLFS_SAMPLE"]),
            result,
        )
    result["pushedAt"] = time.time()
    storage.write_bytes(f"{out}/result.json", json.dumps(result).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
