"""Packs: one trainer invocation trains k members of an epoch, and each member equals the same sample trained
alone (weights, BatchNorm statistics, optimizer state, reward, checkpoint bytes on the sequential path; float
tolerance on the vectorised one). Tiny data and a few steps, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amlfs import storage
from amlfs.contract import EXIT_CONFIG, EXIT_OK, EXIT_TRANSIENT, ConfigError
from amlfs.spaces import SpaceConfig, get_space
from amlfs.spec import LossSearchSpec, spec_to_json
from amlfs_trainer.cli import UsageError, main
from amlfs_trainer.data import DataError
from amlfs_trainer.hardware import cpu_quota
from amlfs_trainer.models import ModelError


def make_spec(model: str, train_limit: int = 32, batch: int = 16, **search: object) -> LossSearchSpec:
    return LossSearchSpec.model_validate(
        {
            "task": {"dataset": "digits", "batchSize": batch, "trainLimit": train_limit},
            "model": {"name": model, "width": 4},
            "optimizer": {"lr": 0.05},
            "search": {"epochs": 3, "samplesPerEpoch": 3, "intervals": 4, **search},
        }
    )


def base_args(tmp_path: Path, spec: LossSearchSpec, epoch: int, *extra: str) -> list[str]:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec_to_json(spec))
    return ["--spec", f"@{spec_file}", "--search", "t", "--epoch", str(epoch), "--device", "cpu", *extra]


def thetas(spec: LossSearchSpec, n: int) -> list[list[float]]:
    ident = get_space("amlfs").identity(SpaceConfig.from_spec(spec))
    return [[v + 0.15 * i * (-1) ** j for j, v in enumerate(ident)] for i in range(n)]


def checkpoint(result: dict) -> dict:
    return torch.load(Path(storage.parse(result["checkpoint"]).key), weights_only=False)


def assert_same_member(solo: dict, packed: dict, exact: bool) -> None:
    assert packed["status"] == solo["status"] == "ok"
    assert packed["steps"] == solo["steps"] and packed["examples"] == solo["examples"]
    a, b = checkpoint(solo), checkpoint(packed)
    assert a["sample"] == b["sample"] and a["theta"] == b["theta"] and a["epoch"] == b["epoch"]
    assert list(a["model"]) == list(b["model"])  # weights and buffers (BatchNorm running stats), same order
    assert a["scheduler"] == b["scheduler"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(sa) == sorted(sb) and sa
    pairs = [(a["model"][k], b["model"][k]) for k in a["model"]]
    pairs += [(sa[j][key], sb[j][key]) for j in sa for key in sa[j] if isinstance(sa[j][key], torch.Tensor)]
    assert all(x.shape == y.shape and x.dtype == y.dtype for x, y in pairs)
    if exact:
        assert packed["sha256"] == solo["sha256"], "a sequential pack member must write the same bytes"
        assert all(torch.equal(x, y) for x, y in pairs)
        assert packed["reward"] == solo["reward"] and packed["trainLoss"] == solo["trainLoss"]
        assert packed["valLoss"] == solo["valLoss"] and packed["testAccuracy"] == solo["testAccuracy"]
        assert packed["valBalancedAccuracy"] == solo["valBalancedAccuracy"]
    else:
        for x, y in pairs:
            torch.testing.assert_close(y.double(), x.double(), rtol=1e-4, atol=1e-5)
        assert abs(packed["reward"] - solo["reward"]) <= 1.01 / 144  # at most one validation example
        assert abs(packed["valBalancedAccuracy"] - solo["valBalancedAccuracy"]) <= 0.02  # one example of a class
        assert packed["trainLoss"] == pytest.approx(solo["trainLoss"], rel=1e-4)
        assert packed["valLoss"] == pytest.approx(solo["valLoss"], rel=1e-3)


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
@pytest.mark.parametrize("model", ["small-cnn", "resnet20"])
def test_pack_members_equal_the_samples_trained_alone(tmp_path, model, mode):
    spec = make_spec(model)
    # a start with optimizer state (momentum buffers), so that the pack has to carry it into every member
    out0 = f"file://{tmp_path}/e0"
    assert main(base_args(tmp_path, spec, 0, "--sample", "0", "--output", out0)) == EXIT_OK
    r0 = storage.read_json(f"{out0}/result.json")
    start = ["--start", r0["checkpoint"], "--start-sha256", r0["sha256"]]
    k = 2 if model == "resnet20" else 3  # keeps the slower model's test short
    ths = thetas(spec, k)
    solo = []
    for i, th in enumerate(ths):
        out = f"file://{tmp_path}/solo{i}"
        args = base_args(tmp_path, spec, 1, *start, "--sample", str(i), "--theta", json.dumps(th), "--output", out)
        assert main(args) == EXIT_OK
        solo.append(storage.read_json(f"{out}/result.json"))
    members = [{"sample": i, "theta": th, "output": f"file://{tmp_path}/pack{i}"} for i, th in enumerate(ths)]
    args = base_args(tmp_path, spec, 1, *start, "--members", json.dumps(members), "--pack-mode", mode)
    assert main(args) == EXIT_OK
    packed = [storage.read_json(f"{m['output']}/result.json") for m in members]
    for s, p in zip(solo, packed, strict=True):
        assert_same_member(s, p, exact=mode == "sequential")
        assert p["pack"]["size"] == k and p["pack"]["mode"] == mode and p["pack"]["samples"] == list(range(k))
        assert set(p["timings"]) >= {"import", "checkpoint", "data", "model", "setup", "firstStep", "train", "eval"}
        assert set(p["pack"]["shared"]) >= {"data", "model", "checkpoint"}
    assert len({p["sha256"] for p in packed}) == k, "members differ from each other"


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_a_diverging_member_ends_alone_without_reward(tmp_path, mode):
    spec = make_spec("small-cnn", parameterization="paper")
    m = 4
    ident = get_space("amlfs").identity(SpaceConfig(4, "paper"))
    bad = [1e38] * m + [0.0] * m + [1.0] * m + [0.0] * m  # t overflows the target logit to inf
    ths = [ident, bad, [v * 1.05 for v in ident]]
    solo = {}
    for i in (0, 2):
        out = f"file://{tmp_path}/solo{i}"
        args = base_args(tmp_path, spec, 0, "--sample", str(i), "--theta", json.dumps(ths[i]), "--output", out)
        assert main(args) == EXIT_OK
        solo[i] = storage.read_json(f"{out}/result.json")
    members = [{"sample": i, "theta": th, "output": f"file://{tmp_path}/pack{i}"} for i, th in enumerate(ths)]
    assert main(base_args(tmp_path, spec, 0, "--members", json.dumps(members), "--pack-mode", mode)) == EXIT_OK
    r = [storage.read_json(f"{m['output']}/result.json") for m in members]
    assert r[1]["status"] == "no-reward" and r[1]["reward"] is None
    assert not storage.exists(f"{members[1]['output']}/checkpoint.pt")
    for i in (0, 2):
        assert_same_member(solo[i], r[i], exact=mode == "sequential")


@pytest.mark.parametrize("mode", ["sequential", "vectorized"])
def test_a_last_batch_of_one_example_is_dropped(tmp_path, mode):
    spec = make_spec("mlp", train_limit=33, batch=16)  # 16 + 16 + 1: BatchNorm1d cannot train on the 1
    members = [{"sample": i, "output": f"file://{tmp_path}/m{i}"} for i in range(2)]
    assert main(base_args(tmp_path, spec, 0, "--members", json.dumps(members), "--pack-mode", mode)) == EXIT_OK
    for m in members:
        r = storage.read_json(f"{m['output']}/result.json")
        assert r["status"] == "ok" and r["steps"] == 2 and r["examples"] == 32
        assert checkpoint(r)["scheduler"]["last_epoch"] == 2


def test_exit_codes(tmp_path, capsys):
    spec = make_spec("small-cnn", train_limit=32)
    assert (EXIT_OK, EXIT_CONFIG, EXIT_TRANSIENT) == (0, 2, 3)
    members = [{"sample": 0, "output": f"file://{tmp_path}/a"}, {"sample": 0, "output": f"file://{tmp_path}/b"}]
    assert main(base_args(tmp_path, spec, 0, "--members", json.dumps(members))) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "sample 0 appears twice" in err and len(err.splitlines()) == 1
    members = [{"sample": 0, "theta": [1, 2], "output": f"file://{tmp_path}/a"}]
    assert main(base_args(tmp_path, spec, 0, "--members", json.dumps(members))) == EXIT_CONFIG
    assert "theta: 2 numbers" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = f"file://{blocker}/below"  # a storage failure while writing the outputs: worth a retry
    assert main(base_args(tmp_path, spec, 0, "--sample", "0", "--output", out)) == EXIT_TRANSIENT
    assert "transient error" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_unavailable_fails_fast(tmp_path, capsys):
    spec = make_spec("small-cnn", train_limit=32)
    args = base_args(tmp_path, spec, 0, "--sample", "0", "--output", f"file://{tmp_path}/o", "--device", "cuda")
    assert main(args) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "CUDA was requested but is not available" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_trainer_errors_share_one_exit_2_base():
    assert all(issubclass(e, ConfigError) for e in (DataError, ModelError, UsageError))


def test_threads_follow_the_cpu_quota(tmp_path):
    import os

    cpus = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) == cpus
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == cpus
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 1


def test_auto_falls_back_to_sequential_when_the_vectorised_path_fails(tmp_path, monkeypatch):
    from amlfs_trainer import pack

    def broken(start, members):
        raise RuntimeError("vmap: an operator without a batching rule")
        yield  # a generator, like the real one

    monkeypatch.setattr(pack, "choose_path", lambda mode, device, k: "vectorized")
    monkeypatch.setattr(pack, "train_vectorized", broken)
    spec = make_spec("small-cnn", train_limit=32)
    members = [{"sample": i, "output": f"file://{tmp_path}/m{i}"} for i in range(2)]
    assert main(base_args(tmp_path, spec, 0, "--members", json.dumps(members))) == EXIT_OK
    r = storage.read_json(f"{tmp_path}/m1/result.json")
    assert r["status"] == "ok" and r["pack"]["mode"] == "sequential" and "batching rule" in r["pack"]["fallback"]
