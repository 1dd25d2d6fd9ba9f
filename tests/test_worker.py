"""The long-lived trainer worker: each invocation as a fresh `amlfs-trainer` process would run it (the same reward,
the same checkpoint bytes), whatever ran before it in the process; errors end the invocation, not the worker."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from amlfs import contract, storage
from amlfs.contract import EXIT_CONFIG, EXIT_OK
from amlfs.spaces import SpaceConfig, get_space
from amlfs.spec import LossSearchSpec, spec_to_json
from amlfs_trainer import cli, worker

SPEC = LossSearchSpec.model_validate(
    {
        "task": {"dataset": "digits", "batchSize": 32, "trainLimit": 96},
        "model": {"name": "small-cnn", "width": 4},
        "optimizer": {"lr": 0.05},
        "search": {"epochs": 2, "samplesPerEpoch": 3, "intervals": 3},
    }
)
# a loss near cross-entropy, in the space and parameterisation of SPEC
THETA = tuple(v + 0.05 * (-1) ** i for i, v in enumerate(get_space("amlfs").identity(SpaceConfig.from_spec(SPEC))))


def invocation(tmp_path: Path, out: str, epoch: int = 0, sample: int = 0, **kw: Any) -> contract.Invocation:
    spec = tmp_path / "spec.json"
    spec.write_text(spec_to_json(SPEC))
    member = contract.Member(sample, THETA if sample else (), out)
    return contract.Invocation(spec=f"@{spec}", epoch=epoch, members=(member,), device="cpu", threads=1, **kw)


def request(rid: int, inv: contract.Invocation, log: Path) -> dict[str, Any]:
    return {"id": rid, "env": contract.to_env(inv), "log": str(log)}


def serve(req: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    worker.serve(req, sent.append, own_process=False)
    return sent


def fresh(tmp_path: Path, inv: contract.Invocation) -> dict[str, Any]:
    """The same invocation in a fresh `amlfs-trainer` process."""
    env = contract.without_contract_env(os.environ)
    p = subprocess.run(
        [sys.executable, "-m", "amlfs_trainer.cli", *contract.to_argv(inv)], env=env, capture_output=True
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    return storage.read_json(f"{inv.members[0].output}/result.json")


def test_invocations_in_one_process_ignore_what_ran_before(tmp_path):
    first = serve(request(1, invocation(tmp_path, f"file://{tmp_path}/a", sample=1), tmp_path / "a.log"))
    assert [m["event"] for m in first] == ["started", "member", "done"]
    assert first[1]["sample"] == 1 and first[-1] == {"event": "done", "id": 1, "rc": EXIT_OK, "message": ""}
    r1 = storage.read_json(f"file://{tmp_path}/a/result.json")
    # another task in between, then process-wide state a previous invocation (or anything else) might leave
    serve(request(2, invocation(tmp_path, f"file://{tmp_path}/b", sample=2), tmp_path / "b.log"))
    torch.manual_seed(12345)
    random.seed(1)
    np.random.seed(1)
    torch.rand(100)
    torch.backends.cudnn.benchmark = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        again = serve(request(3, invocation(tmp_path, f"file://{tmp_path}/c", sample=1), tmp_path / "c.log"))
        assert torch.backends.cudnn.benchmark is False and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(False)
    assert again[-1]["rc"] == EXIT_OK
    r3 = storage.read_json(f"file://{tmp_path}/c/result.json")
    assert (r3["reward"], r3["sha256"], r3["trainLoss"]) == (r1["reward"], r1["sha256"], r1["trainLoss"])
    assert again[1]["sha256"] == r1["sha256"] and again[1]["reward"] == r1["reward"]


def test_a_bad_invocation_ends_alone(tmp_path, monkeypatch):
    log = tmp_path / "bad.log"
    # a configuration error: exit code 2, one line in the log, nothing written, never "started"
    msgs = serve(request(1, invocation(tmp_path, f"file://{tmp_path}/x", epoch=5), log))
    assert [m["event"] for m in msgs] == ["done"] and msgs[0]["rc"] == EXIT_CONFIG
    assert "--epoch 5" in msgs[0]["message"] and "amlfs-trainer: error: --epoch 5" in log.read_text()
    assert not (tmp_path / "x").exists()
    # requests that are not an invocation of the contract
    for bad in ({"id": 2}, {"id": 3, "env": {"PATH": "/bin"}}, {"id": 4, "env": {"AMLFS_EPOCH": 1}}, [1]):
        (done,) = serve(bad)  # type: ignore[arg-type]
        assert done["event"] == "done" and done["rc"] == EXIT_CONFIG and done["message"].startswith("worker request")

    # an unexpected exception: exit code 1 with the traceback in the log, like a crashed process
    def broken(job, started, on_result=None):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(cli, "run", broken)
    msgs = serve(request(5, invocation(tmp_path, f"file://{tmp_path}/y"), tmp_path / "crash.log"))
    assert msgs[-1]["rc"] == 1 and "RuntimeError: something unexpected" in msgs[-1]["message"]
    assert "Traceback" in (tmp_path / "crash.log").read_text()
    monkeypatch.undo()
    msgs = serve(request(6, invocation(tmp_path, f"file://{tmp_path}/z"), tmp_path / "z.log"))
    assert msgs[-1]["rc"] == EXIT_OK and storage.exists(f"file://{tmp_path}/z/result.json")


@pytest.mark.slow
def test_a_worker_process_serves_invocation_after_invocation(tmp_path):
    """The real process: protocol on stdout, each invocation's output in its log, a configuration error and a
    malformed line answered without ending the worker, results equal to fresh processes', a pack of two."""
    good = invocation(tmp_path, f"file://{tmp_path}/w1", sample=1)
    pack = contract.Invocation(
        spec=good.spec,
        epoch=0,
        device="cpu",
        threads=1,
        members=(
            contract.Member(2, THETA, f"file://{tmp_path}/p2"),
            contract.Member(1, THETA, f"file://{tmp_path}/p1"),
        ),
    )
    lines = [
        request(1, invocation(tmp_path, f"file://{tmp_path}/x", epoch=9), tmp_path / "1.log"),
        "not json",
        request(2, good, tmp_path / "2.log"),
        request(3, pack, tmp_path / "3.log"),
    ]
    stdin = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    env = contract.without_contract_env(os.environ)
    p = subprocess.run(
        [sys.executable, "-m", "amlfs_trainer.worker"], input=stdin.encode(), env=env, capture_output=True
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    msgs = [json.loads(line) for line in p.stdout.decode().splitlines()]  # nothing but protocol on stdout
    assert msgs[0]["event"] == "ready" and msgs[0]["protocol"] == worker.PROTOCOL
    events = [(m["event"], m.get("id"), m.get("rc", m.get("sample"))) for m in msgs[1:]]
    assert events == [
        ("done", 1, EXIT_CONFIG),
        ("done", None, EXIT_CONFIG),
        ("started", 2, None),
        ("member", 2, 1),
        ("done", 2, EXIT_OK),
        ("started", 3, None),
        ("member", 3, 2),
        ("member", 3, 1),
        ("done", 3, EXIT_OK),
    ]
    assert "--epoch 9" in (tmp_path / "1.log").read_text()
    assert '"sample": 1' in (tmp_path / "2.log").read_text()  # the trainer's own stdout went to the log
    ref = fresh(tmp_path, invocation(tmp_path, f"file://{tmp_path}/f1", sample=1))
    for out in ("w1", "p1"):
        r = storage.read_json(f"file://{tmp_path}/{out}/result.json")
        assert (r["reward"], r["sha256"]) == (ref["reward"], ref["sha256"])
    r2 = storage.read_json(f"file://{tmp_path}/p2/result.json")
    assert r2["pack"]["size"] == 2 and r2["sha256"] != ref["sha256"]
