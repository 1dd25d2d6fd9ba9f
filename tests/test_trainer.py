"""The trainer CLI contract: one sample of one epoch, through file:// and a real S3 server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amlfs import storage
from amlfs.spaces import SpaceConfig, get_space
from amlfs.spec import InitSpec, LossSearchSpec, spec_to_json
from amlfs_trainer.cli import EXIT_CONFIG, EXIT_OK, EXIT_TRANSIENT, main
from amlfs_trainer.data import load_task
from amlfs_trainer.models import build_model
from amlfs_trainer.optim import lr_factor, schedule_epochs
from amlfs_trainer.train import sample_seed

SPEC = LossSearchSpec.model_validate(
    {
        "task": {"dataset": "digits", "batchSize": 32, "trainLimit": 256},
        "model": {"name": "small-cnn", "width": 8},
        "optimizer": {"lr": 0.05},
        # independent data orders per sample (the tests of common random numbers turn them on)
        "search": {"epochs": 3, "samplesPerEpoch": 2, "intervals": 4, "commonRandomNumbers": False},
    }
)


def args(tmp_path: Path, epoch: int, sample: int, out: str, *extra: str, spec: LossSearchSpec = SPEC) -> list[str]:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec_to_json(spec))
    return [
        "--spec",
        f"@{spec_file}",
        "--search",
        "t",
        "--epoch",
        str(epoch),
        "--sample",
        str(sample),
        "--output",
        out,
        "--device",
        "cpu",
        *extra,
    ]


def identity() -> list[float]:
    return get_space("amlfs").identity(SpaceConfig.from_spec(SPEC))


def test_one_epoch_then_the_next_from_its_checkpoint(tmp_path):
    out0 = f"file://{tmp_path}/e0/s0"
    assert main(args(tmp_path, 0, 0, out0)) == EXIT_OK
    r0 = storage.read_json(f"{out0}/result.json")
    assert r0["status"] == "ok" and 0.0 <= r0["reward"] <= 1.0
    assert r0["reward"] == r0["valAccuracy"] and "testAccuracy" in r0
    assert r0["theta"] == identity() and r0["program"]["kind"] == "piecewise"
    assert set(r0["timings"]) >= {"setup", "train", "eval", "save", "total"}
    local = Path(storage.parse(r0["checkpoint"]).key)
    assert storage.sha256_file(local) == r0["sha256"]
    ck = torch.load(local, weights_only=False)
    assert ck["epoch"] == 1 and set(ck) >= {"model", "optimizer", "scheduler"}
    assert ck["optimizer"]["state"], "momentum buffers must be saved"
    steps0 = ck["scheduler"]["last_epoch"]
    assert steps0 == r0["steps"] == 8  # 256 examples / batch 32

    out1 = f"file://{tmp_path}/e1/s1"
    theta = [v + 0.1 for v in identity()]
    assert (
        main(
            args(
                tmp_path,
                1,
                1,
                out1,
                "--start",
                r0["checkpoint"],
                "--start-sha256",
                r0["sha256"],
                "--theta",
                json.dumps(theta),
            )
        )
        == EXIT_OK
    )
    r1 = storage.read_json(f"{out1}/result.json")
    ck1 = torch.load(Path(storage.parse(r1["checkpoint"]).key), weights_only=False)
    assert ck1["epoch"] == 2 and r1["theta"] == theta
    assert ck1["scheduler"]["last_epoch"] == 2 * steps0  # the LR schedule continues, not restarts
    # optimizer state carried over: momentum buffers differ from a fresh optimizer's first epoch
    k = next(iter(ck1["optimizer"]["state"]))
    m0, m1 = (c["optimizer"]["state"][k]["momentum_buffer"] for c in (ck, ck1))
    assert not torch.equal(m0, m1)


def train_epochs(tmp_path: Path, spec: LossSearchSpec, epochs: range, start: dict | None) -> list[dict]:
    """Sample 0 of each epoch in turn, each from the previous one's checkpoint; the checkpoints loaded."""
    out = []
    for e in epochs:
        prefix = f"file://{tmp_path}/e{e}"
        more = ["--start", start["checkpoint"], "--start-sha256", start["sha256"]] if start else []
        assert main(args(tmp_path, e, 0, prefix, *more, spec=spec)) == EXIT_OK
        start = storage.read_json(f"{prefix}/result.json")
        out.append(torch.load(Path(storage.parse(start["checkpoint"]).key), weights_only=False) | {"result": start})
    return out


def lr(ck: dict) -> float:
    return ck["optimizer"]["param_groups"][0]["lr"]


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_raised_epochs_continue_at_the_final_lr_of_the_original_schedule(tmp_path, schedule):
    short = SPEC.model_copy(update={"optimizer": SPEC.optimizer.model_copy(update={"schedule": schedule})})
    short = LossSearchSpec.model_validate(short.model_dump() | {"search": short.search.model_dump() | {"epochs": 2}})
    run = train_epochs(tmp_path, short, range(2), None)
    steps = run[0]["scheduler"]["last_epoch"]
    # the run as planned: its schedule spans its 2 epochs
    for e, ck in enumerate(run):
        assert ck["scheduleEpochs"] == 2
        assert lr(ck) == pytest.approx(0.05 * lr_factor(short.optimizer, (e + 1) * steps, 2 * steps, steps))
    final = lr(run[-1])
    assert final == pytest.approx(0.05 * (0.0 if schedule == "cosine" else 0.01))
    # raised to 8 epochs after it finished: the added epochs keep the original schedule, at its final LR
    longer = LossSearchSpec.model_validate(short.model_dump() | {"search": short.search.model_dump() | {"epochs": 8}})
    ext = train_epochs(tmp_path, longer, range(2, 4), run[-1]["result"])
    for ck in ext:
        assert ck["scheduleEpochs"] == 2 and lr(ck) == pytest.approx(final)
        assert ck["scheduler"]["_last_lr"][0] == pytest.approx(final)
    assert ext[-1]["scheduler"]["last_epoch"] == 4 * steps


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_an_edited_optimizer_applies_from_the_next_epoch(tmp_path, name):
    """The restored optimizer and scheduler would keep the peak LR, momentum and weight decay they were saved
    with; an edited spec.optimizer takes effect at the next epoch, at the schedule's current position."""
    first = SPEC.model_copy(update={"optimizer": SPEC.optimizer.model_copy(update={"name": name})})
    for d in "abc":
        (tmp_path / d).mkdir()
    (ck0,) = train_epochs(tmp_path / "a", first, range(1), None)
    steps = ck0["scheduler"]["last_epoch"]
    edited = first.model_copy(
        update={"optimizer": first.optimizer.model_copy(update={"lr": 0.02, "momentum": 0.5, "weight_decay": 0.0})}
    )
    (ck1,) = train_epochs(tmp_path / "b", edited, range(1, 2), ck0["result"])
    assert ck1["scheduler"]["base_lrs"] == [0.02, 0.02]
    assert lr(ck1) == pytest.approx(0.02 * lr_factor(edited.optimizer, 2 * steps, 3 * steps, steps))
    for g in ck1["optimizer"]["param_groups"]:
        assert g["initial_lr"] == 0.02 and g["weight_decay"] == 0.0
        assert (g["momentum"] if name == "sgd" else g["betas"][0]) == 0.5
    # unedited, the next epoch continues exactly as saved
    (same,) = train_epochs(tmp_path / "c", first, range(1, 2), ck0["result"])
    assert same["scheduler"]["base_lrs"] == [0.05, 0.05]
    assert lr(same) == 0.05 * lr_factor(first.optimizer, 2 * steps, 3 * steps, steps)


def test_schedule_span_of_a_checkpoint():
    assert schedule_epochs(None, 10) == 10  # the first epoch: search.epochs
    assert schedule_epochs({"scheduleEpochs": 4, "spec": {"search": {"epochs": 6}}}, 10) == 4
    # written before the span was stored: the epochs of the spec that wrote it, else search.epochs
    assert schedule_epochs({"spec": {"search": {"epochs": 6}}}, 10) == 6
    assert schedule_epochs({"model": {}}, 10) == 10


def test_samples_are_reproducible_and_differ_from_each_other(tmp_path):
    outs = [f"file://{tmp_path}/{name}" for name in ("a", "b", "c")]
    assert main(args(tmp_path, 0, 0, outs[0])) == EXIT_OK
    assert main(args(tmp_path, 0, 0, outs[1])) == EXIT_OK
    assert main(args(tmp_path, 0, 1, outs[2])) == EXIT_OK
    ra, rb, rc = (storage.read_json(f"{o}/result.json") for o in outs)
    assert ra["trainLoss"] == rb["trainLoss"] and ra["reward"] == rb["reward"]
    wa = torch.load(Path(storage.parse(ra["checkpoint"]).key), weights_only=False)["model"]
    wb = torch.load(Path(storage.parse(rb["checkpoint"]).key), weights_only=False)["model"]
    wc = torch.load(Path(storage.parse(rc["checkpoint"]).key), weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa), "sample 1 must see another data order"


def test_common_random_numbers_share_the_data_order_except_in_selection_only(tmp_path):
    crn = SPEC.search.model_copy(update={"common_random_numbers": True})
    assert sample_seed(crn, 3, 2) == sample_seed(crn, 3, 0) == sample_seed(SPEC.search, 3, 0)
    assert sample_seed(crn, 3, 0) != sample_seed(crn, 4, 0)
    assert sample_seed(SPEC.search, 3, 2) != sample_seed(SPEC.search, 3, 0)
    sel = crn.model_copy(update={"mode": "selection-only"})
    assert sample_seed(sel, 3, 2) != sample_seed(sel, 3, 0)
    spec = SPEC.model_copy(update={"search": crn})
    outs = [f"file://{tmp_path}/{name}" for name in ("a", "b")]
    assert main(args(tmp_path, 0, 0, outs[0], spec=spec)) == EXIT_OK
    assert main(args(tmp_path, 0, 3, outs[1], spec=spec)) == EXIT_OK
    wa, wb = (torch.load(Path(storage.parse(f"{o}/checkpoint.pt").key), weights_only=False)["model"] for o in outs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same loss and common random numbers: same epoch"


@pytest.mark.parametrize("kind", ["neg-val-loss", "accuracy+loss", "balanced-accuracy", "neg-balanced-val-loss"])
def test_reward_from_the_validation_cross_entropy_or_per_class_recall(tmp_path, kind):
    spec = SPEC.model_copy(update={"search": SPEC.search.model_copy(update={"reward": kind})})
    out = f"file://{tmp_path}/r"
    theta = [0.3] * len(identity())  # not cross-entropy: the validation loss is cross-entropy all the same
    assert main(args(tmp_path, 0, 0, out, "--theta", json.dumps(theta), spec=spec)) == EXIT_OK
    r = storage.read_json(f"{out}/result.json")
    acc, loss, balanced, bal_loss = r["valAccuracy"], r["valLoss"], r["valBalancedAccuracy"], r["valBalancedLoss"]
    want = {
        "neg-val-loss": -loss,
        "accuracy+loss": acc - 0.01 * loss,
        "balanced-accuracy": balanced,
        "neg-balanced-val-loss": -bal_loss,
    }[kind]
    assert loss > 0 and r["reward"] == pytest.approx(want)
    # plain cross-entropy, accuracy and mean per-class recall of the saved model on the validation split
    data = load_task(spec.task, torch.device("cpu"))
    model = build_model(spec.model, data.num_classes, data.input_shape)
    model.load_state_dict(torch.load(Path(storage.parse(r["checkpoint"]).key), weights_only=False)["model"])
    model.eval()
    with torch.no_grad():
        xs, ys = zip(*data.eval_batches("val", 10_000), strict=True)
        logits, y = model(torch.cat(xs)), torch.cat(ys)
        ce = torch.nn.functional.cross_entropy(logits, y).item()
        rows = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    per_class = [rows[y == c].mean().item() for c in range(data.num_classes) if (y == c).any()]
    assert bal_loss == pytest.approx(sum(per_class) / len(per_class), rel=1e-5)
    pred = logits.argmax(1)
    recalls = [(pred[y == c] == c).float().mean().item() for c in range(data.num_classes) if (y == c).any()]
    assert loss == pytest.approx(ce, rel=1e-5) and acc == pytest.approx((pred == y).float().mean().item())
    assert balanced == pytest.approx(sum(recalls) / len(recalls)) and balanced != pytest.approx(acc)


def test_fixed_preset_with_class_balance_trains(tmp_path):
    init = InitSpec(preset="sce", class_balance=0.999)
    spec = SPEC.model_copy(update={"search": SPEC.search.model_copy(update={"mode": "selection-only", "init": init})})
    out = f"file://{tmp_path}/cb"
    assert main(args(tmp_path, 0, 0, out, spec=spec)) == EXIT_OK
    r = storage.read_json(f"{out}/result.json")
    assert r["status"] == "ok" and r["program"]["name"] == "sce" and r["program"]["classBalance"] == 0.999


def test_non_finite_loss_ends_the_sample_without_reward(tmp_path):
    spec = SPEC.model_copy(update={"search": SPEC.search.model_copy(update={"parameterization": "paper"})})
    m = 4
    theta = [1e38] * m + [0.0] * m + [1.0] * m + [0.0] * m  # t overflows the target logit to inf
    out = f"file://{tmp_path}/nan"
    assert main(args(tmp_path, 0, 0, out, "--theta", json.dumps(theta), spec=spec)) == EXIT_OK
    r = storage.read_json(f"{out}/result.json")
    assert r["status"] == "no-reward" and r["reward"] is None
    assert not storage.exists(f"{out}/checkpoint.pt")


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = f"file://{tmp_path}/bad"
    assert main(args(tmp_path, 0, 0, out, "--theta", "[1, 2]")) == EXIT_CONFIG
    assert "--theta: 2 numbers" in capsys.readouterr().err
    assert main(args(tmp_path, 1, 0, out)) == EXIT_CONFIG
    assert "--start: epoch 1 needs" in capsys.readouterr().err
    assert main(["--epoch", "0", "--sample", "0", "--output", out]) == EXIT_CONFIG
    assert "--spec: missing" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_corrupt_or_wrong_start_checkpoint_exits_2_nothing_overwritten(tmp_path, capsys):
    out0 = f"file://{tmp_path}/e0"
    assert main(args(tmp_path, 0, 0, out0)) == EXIT_OK
    r0 = storage.read_json(f"{out0}/result.json")
    out1 = f"file://{tmp_path}/e1"
    storage.write_bytes(f"{out1}/result.json", b'{"keep": true}')
    ckpt = Path(storage.parse(r0["checkpoint"]).key)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    assert main(args(tmp_path, 1, 0, out1, "--start", r0["checkpoint"], "--start-sha256", r0["sha256"])) == 2
    err = capsys.readouterr().err.strip()
    assert "sha256 mismatch" in err and len(err.splitlines()) == 1
    ckpt.write_bytes(bytes(data[: len(data) // 3]))  # truncated: unreadable even without a digest to check
    assert main(args(tmp_path, 1, 0, out1, "--start", r0["checkpoint"])) == 2
    assert "unreadable" in capsys.readouterr().err
    assert main(args(tmp_path, 1, 0, out1, "--start", f"file://{tmp_path}/none.pt")) == 2
    assert "not found" in capsys.readouterr().err
    assert storage.read_json(f"{out1}/result.json") == {"keep": True}
    assert not storage.exists(f"{out1}/checkpoint.pt")


def test_round_trip_through_real_s3_in_a_subprocess(tmp_path, s3_server):
    env = dict(os.environ, **s3_server.env())
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec_to_json(SPEC))
    base = f"s3://{s3_server.bucket}/trainer-{os.urandom(3).hex()}"
    common = [sys.executable, "-m", "amlfs_trainer.cli", "--device", "cpu", "--search", "s3t"]
    env |= {
        "AMLFS_SPEC": spec_file.read_text(),
        "AMLFS_EPOCH": "0",
        "AMLFS_SAMPLE": "0",
        "AMLFS_OUTPUT": f"{base}/e0",
    }  # pods pass everything by environment
    p = subprocess.run(common, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    c = s3_server.client()
    result = json.loads(
        c.get_object(Bucket=s3_server.bucket, Key=f"{base[len('s3://amlfs/') :]}/e0/result.json")["Body"].read()
    )
    assert result["sha256"] == summary["sha256"] and result["checkpoint"] == f"{base}/e0/checkpoint.pt"
    p = subprocess.run(
        [
            *common,
            "--epoch",
            "1",
            "--output",
            f"{base}/e1",
            "--start",
            result["checkpoint"],
            "--start-sha256",
            result["sha256"],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    body = c.get_object(Bucket=s3_server.bucket, Key=f"{base[len('s3://amlfs/') :]}/e1/checkpoint.pt")["Body"].read()
    r1 = json.loads(
        c.get_object(Bucket=s3_server.bucket, Key=f"{base[len('s3://amlfs/') :]}/e1/result.json")["Body"].read()
    )
    import hashlib

    assert hashlib.sha256(body).hexdigest() == r1["sha256"]


def s3_data(root: str) -> LossSearchSpec:
    """SPEC on CIFAR-10 read from an s3:// prefix."""
    return SPEC.model_copy(update={"task": SPEC.task.model_copy(update={"dataset": "cifar10", "data_root": root})})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_dataset_unreachable_on_s3_is_transient(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage._clients.clear()
    out = f"file://{tmp_path}/out"
    argv = args(tmp_path, 0, 0, out, "--cache-dir", str(tmp_path / "cache"), spec=s3_data("s3://amlfs/cifar"))
    assert main(argv) == EXIT_TRANSIENT  # retried by the runner and the operator, unlike exit 2
    assert "transient error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    storage._clients.clear()


@pytest.mark.parametrize("where", ["empty-prefix", "no-bucket"])
def test_dataset_missing_on_s3_is_a_config_error(tmp_path, s3_env, capsys, where):
    root = f"s3://{s3_env.bucket}/nothing-{os.urandom(3).hex()}" if where == "empty-prefix" else "s3://no-such-b/x"
    argv = args(tmp_path, 0, 0, f"file://{tmp_path}/out", "--cache-dir", str(tmp_path / "c"), spec=s3_data(root))
    assert main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amlfs-trainer: error: task.dataRoot: ") and root in err[0], err
    assert "; check the" in err[0]


@pytest.mark.parametrize("space", ["search-softmax"])
def test_other_space_trains(tmp_path, space):
    spec = SPEC.model_copy(update={"search": SPEC.search.model_copy(update={"space": space})})
    out = f"file://{tmp_path}/ss"
    assert main(args(tmp_path, 0, 0, out, "--theta", json.dumps([-0.5] * 4), spec=spec)) == EXIT_OK
    assert storage.read_json(f"{out}/result.json")["program"] == {"kind": "search-softmax", "a": [-0.5] * 4}


def test_the_checkpoint_depends_on_the_training_not_on_how_it_ran(tmp_path):
    """Trainer and storage settings (samplesPerPod, image, resources, where results go) leave the checkpoint's bytes
    unchanged, so runs that packed or scheduled differently can be compared by digest."""
    other = SPEC.model_copy(
        update={
            "trainer": SPEC.trainer.model_copy(update={"samples_per_pod": 2, "image": "elsewhere/trainer:2"}),
            "storage": SPEC.storage.model_copy(update={"uri": "s3://bucket/prefix"}),
        }
    )
    for n in "abc":
        (tmp_path / n).mkdir()
    outs = [f"file://{tmp_path}/{n}" for n in ("a", "b")]
    assert main(args(tmp_path / "a", 0, 1, outs[0])) == EXIT_OK
    assert main(args(tmp_path / "b", 0, 1, outs[1], spec=other)) == EXIT_OK
    ra, rb = (storage.read_json(f"{o}/result.json") for o in outs)
    assert ra["sha256"] == rb["sha256"]
    lr = SPEC.model_copy(update={"optimizer": SPEC.optimizer.model_copy(update={"lr": 0.051})})
    assert main(args(tmp_path / "c", 0, 1, f"file://{tmp_path}/c", spec=lr)) == EXIT_OK
    assert storage.read_json(f"file://{tmp_path}/c/result.json")["sha256"] != ra["sha256"]
