"""Retrieval and verification through the trainer: open-set digits, a tiny Market-1501 layout, a tiny CASIA-WebFace
tree with LFW pairs; packs; one-line errors with exit code 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amlfs import storage
from amlfs.spec import LossSearchSpec, spec_to_json
from amlfs_trainer.cli import EXIT_CONFIG, EXIT_OK, main
from tests.support.task_layouts import casia, jpeg, lfw, market, pairs_text

DIGITS_RETRIEVAL = {
    "task": {"dataset": "digits", "kind": "retrieval", "heldOutClasses": 4, "valFraction": 0.34, "batchSize": 64},
    "model": {"name": "small-cnn", "width": 8},
    "search": {"epochs": 2, "samplesPerEpoch": 2, "commonRandomNumbers": False},
}


def spec_of(doc: dict) -> LossSearchSpec:
    return LossSearchSpec.model_validate(doc)


def run(tmp_path: Path, spec: LossSearchSpec, out: str, *extra: str, epoch: int = 0, sample: int = 0) -> int:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec_to_json(spec))
    argv = ["--spec", f"@{spec_file}", "--search", "t", "--epoch", str(epoch), "--device", "cpu", "--threads", "1"]
    if "--members" not in extra:
        argv += ["--sample", str(sample), "--output", out]
    return main([*argv, *extra])


def result(out: str) -> dict:
    return storage.read_json(f"{out}/result.json")


def test_digits_open_set_retrieval(tmp_path: Path) -> None:
    out = f"file://{tmp_path}/s0"
    assert run(tmp_path, spec_of(DIGITS_RETRIEVAL), out) == EXIT_OK
    r = result(out)
    assert r["status"] == "ok" and r["rewardMetric"] == "mAP" and r["reward"] == r["valMAP"]
    for split in ("val", "test"):
        assert 0.0 < r[f"{split}MAP"] <= 1.0
        assert r[f"{split}Rank1"] <= r[f"{split}Rank5"] <= r[f"{split}Rank10"] <= 1.0
        assert r[f"{split}Queries"] > 0
    assert "valAccuracy" not in r  # no classification metrics for an open-set task
    # 4 held-out classes, about 180 digits each, 6 synthetic cameras: 20 % of each (class, camera) as queries
    assert 120 <= r["testQueries"] <= 160


def test_rank1_reward_and_verification(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(DIGITS_RETRIEVAL))
    doc["task"]["reward"] = "rank1"
    out = f"file://{tmp_path}/r1"
    assert run(tmp_path, spec_of(doc), out) == EXIT_OK
    r = result(out)
    assert r["rewardMetric"] == "rank1" and r["reward"] == r["valRank1"]

    doc["task"] |= {"kind": "verification", "reward": ""}
    doc["model"] |= {"head": "cosine"}
    doc["search"] |= {"init": {"preset": "cosface", "margin": 0.2}}
    out = f"file://{tmp_path}/v"
    assert run(tmp_path, spec_of(doc), out) == EXIT_OK
    r = result(out)
    assert r["rewardMetric"] == "accuracy" and r["reward"] == r["valAccuracy"]
    assert 0.5 <= r["valAccuracy"] <= 1.0 and 0.5 <= r["testAccuracy"] <= 1.0
    assert r["valAccuracyStd"] >= 0.0 and r["testPairs"] % 20 == 0  # 10 folds of matched + mismatched


def test_pack_equals_solo_runs_and_vectorised_falls_back(tmp_path: Path) -> None:
    spec = spec_of(DIGITS_RETRIEVAL)
    solo = []
    for s in (0, 1):
        out = f"file://{tmp_path}/solo{s}"
        assert run(tmp_path, spec, out, sample=s) == EXIT_OK
        solo.append(result(out))
    members = [{"sample": s, "theta": [], "output": f"file://{tmp_path}/pack{s}"} for s in (0, 1)]
    assert run(tmp_path, spec, "", "--members", json.dumps(members), "--pack-mode", "vectorized") == EXIT_OK
    for s in (0, 1):
        r = result(f"file://{tmp_path}/pack{s}")
        assert r["pack"]["mode"] == "sequential" and "retrieval packs train sequentially" in r["pack"]["fallback"]
        assert r["sha256"] == solo[s]["sha256"]
        assert (r["valMAP"], r["testMAP"], r["testRank1"]) == (
            solo[s]["valMAP"],
            solo[s]["testMAP"],
            solo[s]["testRank1"],
        )
    assert solo[0]["sha256"] != solo[1]["sha256"]  # the two samples did differ


def market_spec(root: Path) -> LossSearchSpec:
    return spec_of(
        {
            "task": {
                "dataset": "market1501",
                "kind": "retrieval",
                "dataRoot": str(root),
                "imageSize": [32, 16],
                "valFraction": 0.25,
                "batchSize": 8,
                "evalBatchSize": 16,
                "numWorkers": 0,
            },
            "model": {"name": "small-cnn", "width": 8, "bnNeck": True},
            "search": {"epochs": 2},
        }
    )


def test_market1501_layout_trains_and_evaluates(tmp_path: Path) -> None:
    n = market(tmp_path / "market", train_people=8, test_people=4, cams=3, per_cam=2)
    out = f"file://{tmp_path}/m"
    assert run(tmp_path, market_spec(tmp_path / "market"), out) == EXIT_OK
    r = result(out)
    assert r["status"] == "ok" and r["reward"] == r["valMAP"] and r["rewardMetric"] == "mAP"
    # 6 of 8 training identities train (2 held out for validation), 6 images each
    assert r["examples"] == 6 * 6
    # every test query (4 people x 3 cameras) has its person in the gallery from 2 other cameras
    assert r["testQueries"] == n["query"] == 12
    # validation: 2 held-out people x 3 cameras, one query per (person, camera) group of 2 images
    assert r["valQueries"] == 6
    assert 0.0 < r["testMAP"] <= 1.0 and 0.0 < r["valMAP"] <= 1.0
    # the second epoch resumes from the first one's checkpoint
    out1 = f"file://{tmp_path}/m1"
    start = ["--start", r["checkpoint"], "--start-sha256", r["sha256"]]
    assert run(tmp_path, market_spec(tmp_path / "market"), out1, *start, epoch=1) == EXIT_OK
    assert result(out1)["status"] == "ok"


def face_spec(root: Path, pairs: Path, images: Path) -> LossSearchSpec:
    return spec_of(
        {
            "task": {
                "dataset": "casia-webface",
                "kind": "verification",
                "dataRoot": str(root),
                "pairs": {"file": str(pairs), "imagesRoot": str(images)},
                "imageSize": [24, 24],
                "valFraction": 0.25,
                "batchSize": 8,
                "numWorkers": 0,
            },
            "model": {"name": "small-cnn", "width": 8, "head": "cosine", "scale": 16},
            "search": {"epochs": 1, "init": {"preset": "arcface", "margin": 0.2}},
        }
    )


def test_casia_webface_with_lfw_pairs(tmp_path: Path) -> None:
    casia(tmp_path / "casia", people=12, per_person=4)
    lfw(tmp_path / "lfw")
    (tmp_path / "pairs.txt").write_text(pairs_text(folds=10))
    out = f"file://{tmp_path}/f"
    assert run(tmp_path, face_spec(tmp_path / "casia", tmp_path / "pairs.txt", tmp_path / "lfw"), out) == EXIT_OK
    r = result(out)
    assert r["status"] == "ok" and r["reward"] == r["valAccuracy"] and r["rewardMetric"] == "accuracy"
    assert r["examples"] == 9 * 4  # 3 of 12 identities held out for the validation pairs
    assert r["testPairs"] == 40  # 10 folds x (2 + 2)
    assert 0.0 <= r["testAccuracy"] <= 1.0 and r["testAccuracyStd"] >= 0.0


def test_bad_files_exit_2_one_line_nothing_written(tmp_path: Path, capsys) -> None:
    market(tmp_path / "market")
    jpeg(tmp_path / "market" / "bounding_box_test" / "0003_c1.jpg", 3)
    out = tmp_path / "bad"
    assert run(tmp_path, market_spec(tmp_path / "market"), f"file://{out}") == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0003_c1.jpg: not a Market-1501 file name" in err, err
    assert not out.exists()

    casia(tmp_path / "casia", people=8, per_person=2)
    lfw(tmp_path / "lfw")
    lines = pairs_text(folds=2).splitlines()
    lines[7] = "Alan_Turing 1 Grace_Hopper"  # a mismatched pair without its second number
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    spec = face_spec(tmp_path / "casia", tmp_path / "pairs.txt", tmp_path / "lfw")
    assert run(tmp_path, spec, f"file://{out}") == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'pairs.txt'}:8: expected a mismatched pair" in err, err
    assert not out.exists()


def test_too_many_held_out_classes(tmp_path: Path, capsys) -> None:
    doc = json.loads(json.dumps(DIGITS_RETRIEVAL))
    doc["task"]["heldOutClasses"] = 8
    out = tmp_path / "x"
    assert run(tmp_path, spec_of(doc), f"file://{out}") == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert "task.heldOutClasses: 8 of digits's 10 classes" in err and not out.exists(), err


@pytest.mark.slow
def test_open_set_example_end_to_end(tmp_path: Path) -> None:
    from amlfs.cli import main as amlfs_main

    example = Path(__file__).resolve().parents[1] / "examples" / "digits-openset-quick.yaml"
    assert amlfs_main(["run", str(example), "--workdir", str(tmp_path), "--quiet", "--no-report"]) == 0
    run_dir = tmp_path / "digits-openset-quick"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["rewardMetric"] == "mAP" and status["epoch"] == 6
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 6 and {h["rewardMetric"] for h in history} == {"mAP"}
    best = json.loads((run_dir / "best" / "result.json").read_text())
    assert best["reward"] == best["valMAP"] == status["best"]["reward"]
    assert 0.0 < best["testMAP"] <= 1.0 and best["testQueries"] > 0


def test_s3_data_root_pairs_file_and_images_are_copied_to_the_cache(tmp_path: Path, monkeypatch) -> None:
    import torch

    from amlfs.spec import TaskSpec
    from amlfs_trainer.tasks import get_task

    src = tmp_path / "bucket"
    casia(src / "casia", people=12, per_person=4)
    lfw(src / "lfw")
    (src / "pairs.txt").write_text(pairs_text(folds=10))
    calls: list[tuple[str, Path]] = []
    real_prefix, real_file = storage.download_prefix, storage.download_file

    def local(uri: str) -> str:  # S3 stand-in: the real copy, from a file:// twin of the bucket
        return f"file://{src}/{uri.removeprefix('s3://bucket/')}"

    def download_prefix(uri: str, dest: Path) -> Path:
        calls.append((uri, dest))
        return real_prefix(local(uri), dest)

    def download_file(uri: str, path: Path) -> None:
        if uri.startswith("s3://"):  # the real download_prefix copies file by file through here too
            calls.append((uri, path))
            uri = local(uri)
        real_file(uri, path)

    monkeypatch.setattr(storage, "download_prefix", download_prefix)
    monkeypatch.setattr(storage, "download_file", download_file)
    task = TaskSpec.model_validate(
        {
            "dataset": "casia-webface",
            "kind": "verification",
            "dataRoot": "s3://bucket/casia",
            "pairs": {"file": "s3://bucket/pairs.txt", "imagesRoot": "s3://bucket/lfw"},
            "imageSize": [24, 24],
            "valFraction": 0.25,
            "numWorkers": 0,
        }
    )
    data = get_task("verification").load(task, torch.device("cpu"), tmp_path / "cache")
    assert sorted(uri for uri, _ in calls) == ["s3://bucket/casia", "s3://bucket/lfw", "s3://bucket/pairs.txt"]
    assert all(dest.is_relative_to(tmp_path / "cache") for _, dest in calls)
    assert data.size("train") == 9 * 4 and data.num_classes == 9
    assert len(data.pairs["test-pairs"].a) == 40  # type: ignore[attr-defined]
    assert data.size("val-pairs") == 3 * 4  # the held-out identities' images


def test_bn_neck_is_absent_unless_asked_and_classification_evaluates_as_the_pack() -> None:
    import torch

    from amlfs.spec import ModelSpec, TaskSpec
    from amlfs_trainer import pack
    from amlfs_trainer.models import build_model
    from amlfs_trainer.tasks import get_task

    plain = build_model(ModelSpec(name="mlp", width=8), 10, (1, 8, 8))
    assert not any(k.startswith("neck.") for k in plain.state_dict())
    necked = build_model(ModelSpec(name="mlp", width=8, bn_neck=True), 10, (1, 8, 8))
    assert {"neck.weight", "neck.bias", "neck.running_mean"} <= set(necked.state_dict())
    necked.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(necked.embed(x), necked.neck(necked.features(x)))

    task = get_task("classification")
    data = task.load(TaskSpec(dataset="digits"), torch.device("cpu"), None)
    metrics = task.evaluate(plain, data, 256, 1.0)
    for split in ("val", "test"):
        got = tuple(metrics[f"{split}{k}"] for k in ("Accuracy", "Loss", "BalancedAccuracy", "BalancedLoss"))
        assert got == pack.evaluate_model(plain, data, split, 256, 1.0)
