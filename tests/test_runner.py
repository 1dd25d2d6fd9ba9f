"""`amlfs run` end to end on digits: real trainer subprocesses, file:// storage, resume after interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from amlfs import storage
from amlfs.cli import main
from amlfs.runner import LocalRunner
from amlfs.spec import SpecError, parse_manifest
from amlfs.status import LossSearchStatus

MANIFEST = {
    "apiVersion": "amlfs.io/v1alpha1",
    "kind": "LossSearch",
    "metadata": {"name": "tiny"},
    "spec": {
        "task": {"dataset": "digits", "batchSize": 32, "trainLimit": 320},
        "model": {"name": "small-cnn", "width": 8},
        "optimizer": {"lr": 0.05},
        "search": {"epochs": 3, "samplesPerEpoch": 2, "intervals": 3, "seed": 3},
    },
}


class Interrupt(KeyboardInterrupt):
    pass


def history(root: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(f"{root}/history.jsonl").decode().splitlines()]


def test_cli_run_end_to_end(tmp_path, capsys):
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(MANIFEST))
    work = tmp_path / "runs"
    assert main(["run", str(f), "--workdir", str(work), "--parallel", "2", "--quiet"]) == 0
    d = work / "tiny"
    status = LossSearchStatus.model_validate_json((d / "status.json").read_text())
    assert status.phase == "Succeeded" and status.epoch == 3 and len(status.history) == 3
    raw = json.loads((d / "status.json").read_text())
    assert set(raw) >= {"phase", "epoch", "mu", "sigma", "samples", "best", "history"} and "bestReward" in str(raw)
    best = Path(storage.parse(f"file://{d}/best/checkpoint.pt").key)
    assert storage.sha256_file(best) == status.best.sha256
    hist = history(f"file://{d}")
    assert [h["epoch"] for h in hist] == [0, 1, 2] and all(len(h["thetas"]) == 2 for h in hist)
    assert status.best.reward == max(h["bestReward"] for h in hist)
    final = storage.read_json(f"file://{d}/final/mu.json")
    assert final["mu"] == status.mu and final["program"]["kind"] == "piecewise"
    last = hist[-1]
    assert storage.read_json(f"file://{d}/final/result.json")["sha256"] == last["sha256"]
    assert (d / "report.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "best reward" in out and "final μ" in out
    assert status.best.reward > 0.5  # far above chance (0.1) on 10-class digits


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    m = parse_manifest(MANIFEST)
    ref = LocalRunner(m, tmp_path / "ref", parallel=2).run()

    calls = {"n": 0}

    def crash_after_first_epoch(kind: str, data: dict) -> None:
        if kind == "epoch":
            calls["n"] += 1
            if calls["n"] == 1:
                raise Interrupt()

    r1 = LocalRunner(m, tmp_path / "int", parallel=2, on_event=crash_after_first_epoch)
    with pytest.raises(Interrupt):
        r1.run()
    mid = LossSearchStatus.model_validate_json((tmp_path / "int" / "tiny" / "status.json").read_text())
    assert mid.phase == "Running" and mid.epoch == 0  # the epoch closed in storage, not yet in the status

    def crash_mid_epoch(kind: str, data: dict) -> None:
        if kind == "start" and data["epoch"] == 2 and data["sample"] == 1:
            raise Interrupt()  # a trainer is running: it is stopped and restarted on resume

    with pytest.raises(Interrupt):
        LocalRunner(m, tmp_path / "int", parallel=2, on_event=crash_mid_epoch).run()
    resumed = LocalRunner(m, tmp_path / "int", parallel=2).run()
    assert resumed.phase == "Succeeded"
    assert resumed.mu == ref.mu
    assert resumed.best == ref.best.model_copy(update={"checkpoint": resumed.best.checkpoint})
    h_ref, h_res = history(f"file://{tmp_path}/ref/tiny"), history(f"file://{tmp_path}/int/tiny")
    assert [h["thetas"] for h in h_res] == [h["thetas"] for h in h_ref]
    assert [h["rewards"] for h in h_res] == [h["rewards"] for h in h_ref]
    assert [h["sha256"] for h in h_res] == [h["sha256"] for h in h_ref]


def test_changed_search_space_is_refused_on_resume(tmp_path, capsys):
    f = tmp_path / "tiny.yaml"
    doc = json.loads(json.dumps(MANIFEST))
    doc["spec"]["search"]["epochs"] = 1
    f.write_text(yaml.safe_dump(doc))
    assert main(["run", str(f), "--workdir", str(tmp_path), "--quiet", "--no-report"]) == 0
    status_before = (tmp_path / "tiny" / "status.json").read_text()
    doc["spec"]["search"]["intervals"] = 5
    f.write_text(yaml.safe_dump(doc))
    assert main(["run", str(f), "--workdir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("amlfs: error: spec.search.intervals: changed since this search began")
    assert (tmp_path / "tiny" / "status.json").read_text() == status_before
    # raising epochs on a finished search continues it
    doc["spec"]["search"]["intervals"] = 3
    doc["spec"]["search"]["epochs"] = 2
    f.write_text(yaml.safe_dump(doc))
    assert main(["run", str(f), "--workdir", str(tmp_path), "--quiet", "--no-report"]) == 0
    st = LossSearchStatus.model_validate_json((tmp_path / "tiny" / "status.json").read_text())
    assert st.epoch == 2 and [h.epoch for h in st.history] == [0, 1]


def test_resume_of_a_search_begun_before_new_fields_existed(tmp_path):
    doc = json.loads(json.dumps(MANIFEST))
    doc["spec"]["search"] |= {"commonRandomNumbers": False, "antithetic": False}
    runner = LocalRunner(parse_manifest(doc), tmp_path)
    runner.dir.mkdir(parents=True)
    old = json.loads(runner.spec.model_dump_json(by_alias=True))
    for key in ("commonRandomNumbers", "antithetic", "reward"):
        del old["search"][key]  # a spec.json from before the fields: it ran without them
    runner.spec_path.write_text(json.dumps(old))
    assert runner.load() is None
    # the new defaults would change how the old search samples: refused, naming the field
    runner = LocalRunner(parse_manifest(MANIFEST), tmp_path)
    with pytest.raises(SpecError, match=r"spec.search.commonRandomNumbers: changed"):
        runner.load()
