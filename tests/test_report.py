"""`amlfs report`: a search's summary from its storage root alone, the same as `amlfs run` printed at its end;
running searches, roots from before the spec was stored, bad input; an S3 root."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from amlfs import storage
from amlfs.cli import example_path, main
from amlfs.status import LossSearchStatus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Run:
    dir: Path  # the run's storage root (no storage URI in the spec: its work directory)
    out: str  # what `amlfs run` printed on standard output: its summary
    status: LossSearchStatus


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The bundled example cut to 2 epochs of 2 samples on 320 images, run once by `amlfs run` for the module
    (about 5 s on 2 idle cores)."""
    tmp = tmp_path_factory.mktemp("report")
    doc = yaml.safe_load(example_path("digits-quick").read_text())
    doc["spec"]["search"] |= {"epochs": 2, "samplesPerEpoch": 2}
    doc["spec"]["task"]["trainLimit"] = 320  # a third of the CPU time of the whole training split
    manifest = tmp / "tiny.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["run", str(manifest), "--workdir", str(tmp / "runs"), "--parallel", "1", "--quiet", "--no-report"])
    assert rc == 0
    d = tmp / "runs" / "digits-quick"
    return Run(d, out.getvalue(), LossSearchStatus.model_validate_json((d / "status.json").read_text()))


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["report", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def as_json(capsys: pytest.CaptureFixture[str], root: str) -> dict:
    rc, out, err = report(capsys, root, "--json")
    assert rc == 0, err
    return json.loads(out)


def copy_of(run: Run, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    """The run's root without its checkpoints (a report never reads them) and without `drop`."""
    shutil.copytree(run.dir, dest, ignore=shutil.ignore_patterns("*.pt", "logs", *drop))
    return dest


def test_report_of_a_finished_run_is_what_the_run_printed(run, capsys, tmp_path):
    rc, out, _ = report(capsys, str(run.dir))
    assert rc == 0 and out == run.out
    assert "Succeeded after 2 epochs" in out and "final μ" in out and f"{run.status.best.reward:.4f}" in out
    doc = as_json(capsys, f"file://{run.dir}")
    st = run.status
    assert (doc["phase"], doc["epochs"], doc["rewardMetric"]) == ("Succeeded", st.epoch, st.reward_metric)
    assert doc["best"] == st.best.model_dump(mode="json", by_alias=True) and doc["mu"] == st.mu
    assert doc["best"]["checkpoint"] == f"file://{run.dir}/best/checkpoint.pt" and len(doc["muNames"]) == len(st.mu)
    assert [h["bestReward"] for h in doc["history"]] == [h.best_reward for h in st.history]
    png = tmp_path / "out" / "report.png"
    rc, _, err = report(capsys, str(run.dir), "--png", str(png))
    assert rc == 0 and "".join(err.split()) == f"report:{png}"  # (a long path wraps)
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    assert [p.name for p in png.parent.iterdir()] == ["report.png"]  # no temporary file left behind


def test_a_running_search_is_reported_as_far_as_it_got(run, capsys, tmp_path):
    # a cluster search's root mid-run: epoch 0 closed, epoch 1's samples written, no final/ and no status.json
    root = copy_of(run, tmp_path / "root", drop=("final", "status.json"))
    history = (root / "history.jsonl").read_text().splitlines()
    (root / "history.jsonl").write_text(history[0] + "\n")
    rc, out, _ = report(capsys, str(root))
    assert rc == 0 and "Running after 1 epochs" in out and "epoch 1 in progress, samples done: 2 of 2" in out
    assert "no final/mu.json yet" in out
    doc = as_json(capsys, str(root))
    assert (doc["phase"], doc["phaseFrom"], doc["epochs"], doc["resultsThisEpoch"]) == ("Running", "records", 1, 2)
    assert doc["mu"] == json.loads(history[0])["muAfter"] and doc["best"]["epoch"] == 0
    # before its first epoch closed a cluster search's root holds its samples' results alone
    first = tmp_path / "first" / "epoch-0000" / "sample-00"
    first.mkdir(parents=True)
    shutil.copy(root / "epoch-0000" / "sample-00" / "result.json", first)
    rc, out, _ = report(capsys, str(tmp_path / "first"))
    assert rc == 0 and "Running after 0 epochs" in out and "samples done: 1" in out and "no spec.json" in out


def test_a_root_written_before_the_spec_was_stored_is_reported_without_mu(run, capsys, tmp_path):
    root = copy_of(run, tmp_path / "old", drop=("spec.json",))
    rc, out, _ = report(capsys, str(root), "--png", str(tmp_path / "old.png"))
    assert rc == 0 and "Succeeded after 2 epochs" in out and "final μ" not in out
    assert "left out: no spec.json under the root" in " ".join(out.split())
    assert (tmp_path / "old.png").read_bytes().startswith(PNG_MAGIC)  # the rewards panel alone
    doc = as_json(capsys, str(root))
    assert doc["mode"] is None and doc["mu"] == run.status.mu and doc["muNames"] is not None  # from final/mu.json


@pytest.mark.parametrize(
    ("root", "says"),
    [
        ("empty", "no search here"),
        ("missing", "no such directory"),
        ("ftp://host/x", "unsupported scheme"),
        ("s3:///x", "missing bucket"),
    ],
)
def test_bad_roots_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, root, says):
    (tmp_path / "empty").mkdir()
    where = root if "://" in root else str(tmp_path / root)
    png = tmp_path / "r.png"
    rc, out, err = report(capsys, where, "--png", str(png), "--json")
    assert rc == 2 and out == "" and not png.exists()
    assert len(err.strip().splitlines()) == 1 and err.startswith("amlfs: error: ") and says in err


def test_a_folder_above_roots_names_them(run, capsys):
    rc, _, err = report(capsys, str(run.dir.parent))
    assert rc == 2 and f"below it: file://{run.dir}" in err


def test_report_from_s3(run, capsys, s3_env, tmp_path):
    prefix = f"s3://{s3_env.bucket}/report/default/digits-quick/uid-1"
    src = copy_of(run, tmp_path / "root", drop=("status.json",))  # a cluster root has no status.json
    for f in src.rglob("*"):
        if f.is_file():
            storage.upload_file(f, f"{prefix}/{f.relative_to(src)}")
    rc, out, _ = report(capsys, prefix)
    unwrapped = "".join(run.out.replace(f"file://{run.dir}", prefix).split())  # the longer URI wraps elsewhere
    assert rc == 0 and "".join(out.split()) == unwrapped
    doc = as_json(capsys, prefix)
    assert (doc["phase"], doc["phaseFrom"], doc["epochs"]) == ("Succeeded", "records", 2)
    assert doc["best"]["reward"] == run.status.best.reward
    rc, _, err = report(capsys, prefix.rsplit("/", 1)[0])
    assert rc == 2 and f"below it: {prefix}" in err
    rc, _, err = report(capsys, "s3://no-such-bucket/x")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "check AWS_ENDPOINT_URL" in err
