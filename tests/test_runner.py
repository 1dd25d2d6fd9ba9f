"""`amlfs run` end to end on digits: real trainer workers and processes, file:// storage, resume after
interruption, a worker killed mid-sample, packs; and how the runner reads what became of a sample."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import yaml

from amlfs import core, storage
from amlfs.cli import main
from amlfs.runner import LocalRunner, Proc, Slot, Task
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    for key in ("kind", "reward", "heldOutClasses", "imageSize", "randomErasing", "pairs"):
        del old["task"][key]
    del old["model"]["bnNeck"]
    runner.spec_path.write_text(json.dumps(old))
    assert runner.load() is None
    # a task kind other than the one the search began with is refused
    changed = json.loads(json.dumps(doc))
    changed["spec"]["task"] |= {"kind": "retrieval", "heldOutClasses": 4}
    with pytest.raises(SpecError, match=r"spec.task: changed since this search began"):
        LocalRunner(parse_manifest(changed), tmp_path).load()
    # the new defaults would change how the old search samples: refused, naming the field
    runner = LocalRunner(parse_manifest(MANIFEST), tmp_path)
    with pytest.raises(SpecError, match=r"^spec.search.(antithetic|commonRandomNumbers): changed"):
        runner.load()


CRD_FILE = Path(__file__).resolve().parents[1] / "crds" / "losssearch.yaml"


def crd_frozen_paths() -> set[str]:
    """Paths below spec that the checked-in CRD's transition rules freeze (what the API server enforces)."""
    schema = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found: set[str] = set()

    def visit(node: dict, path: str) -> None:
        if any(r["rule"] == "self == oldSelf" for r in node.get("x-kubernetes-validations", [])):
            found.add(path)
        for name, sub in node.get("properties", {}).items():
            visit(sub, f"{path}.{name}".lstrip("."))

    visit(schema["properties"]["spec"], "")
    return found


def leaves(doc: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        out.extend(leaves(value, f"{path}.") if isinstance(value, dict) and value else [path])
    return out


def with_changed(doc: dict, path: str) -> dict:
    changed = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    node = changed
    for key in parents:
        node = node[key]
    node[last] = ["changed"]  # differs from every value a spec holds
    return changed


def test_resume_refuses_exactly_what_the_crd_freezes(tmp_path):
    frozen = crd_frozen_paths()
    assert {"search.seed", "search.init", "task", "model"} <= frozen and "search.sigma" not in frozen
    runner = LocalRunner(parse_manifest(MANIFEST), tmp_path)
    runner.dir.mkdir(parents=True)
    current = json.loads(runner.spec.model_dump_json(by_alias=True))
    paths = leaves(current)
    assert len(paths) > 60 and "search.sigma" in paths and "task.labelNoise.rate" in paths
    for path in paths:
        runner.spec_path.write_text(json.dumps(with_changed(current, path)))
        refused = any(path == f or path.startswith(f"{f}.") for f in frozen)
        if refused:
            field = next(f for f in frozen if path == f or path.startswith(f"{f}."))
            with pytest.raises(SpecError, match=rf"^spec\.{re.escape(field)}: changed since this search began"):
                runner.load()
        else:
            assert runner.load() is None, path


def test_changed_sigma_is_resumed_with_the_new_value(tmp_path):
    runner = LocalRunner(parse_manifest(MANIFEST), tmp_path)
    runner.dir.mkdir(parents=True)
    old = json.loads(runner.spec.model_dump_json(by_alias=True))
    old["search"]["sigma"] = 0.5
    runner.spec_path.write_text(json.dumps(old))
    assert runner.load() is None


# --- the worker pool against one process per sample ---------------------------------------------------------

SMALL = json.loads(json.dumps(MANIFEST))
SMALL["metadata"]["name"] = "small"
SMALL["spec"]["task"]["trainLimit"] = 160
SMALL["spec"]["search"].update({"epochs": 2, "samplesPerEpoch": 3})

# a worker whose every member trains half a second longer: a window to kill it in mid-sample
SLOW_WORKER = """
import time
from amlfs_trainer import pack, worker
train_one = pack._train_one
def slow(*args):
    time.sleep(0.5)
    return train_one(*args)
pack._train_one = slow
raise SystemExit(worker.main())
"""


def outcome(root: str, status: LossSearchStatus) -> dict:
    """What must not depend on how the samples were trained: every θ, reward and checkpoint digest, μ, best."""
    h = history(root)
    return {
        "thetas": [x["thetas"] for x in h],
        "rewards": [x["rewards"] for x in h],
        "sha256": [x["sha256"] for x in h],
        "mu": status.mu,
        "best": (status.best.reward, status.best.sha256) if status.best else None,
    }


@pytest.fixture(scope="module")
def fresh_processes(tmp_path_factory) -> dict:
    """The reference: one fresh `amlfs-trainer` process per sample."""
    work = tmp_path_factory.mktemp("fresh")
    r = LocalRunner(parse_manifest(SMALL), work, parallel=2, processes=True)
    status = r.run()
    assert status.phase == "Succeeded"
    return outcome(r.root, status)


@pytest.mark.slow
def test_the_worker_pool_trains_what_fresh_processes_train(tmp_path, fresh_processes):
    events: list[tuple[str, dict]] = []
    r = LocalRunner(parse_manifest(SMALL), tmp_path, parallel=2, on_event=lambda k, d: events.append((k, d)))
    status = r.run()
    assert status.phase == "Succeeded"
    assert outcome(r.root, status) == fresh_processes
    assert len([d for k, d in events if k == "worker"]) == 2  # one start-up per slot, not per sample
    assert not any(k == "sample-failed" for k, _ in events)
    timings = [
        storage.read_json(f"{r.root}/epoch-{e:04d}/sample-{i:02d}/result.json")["timings"]
        for e in range(2)
        for i in range(3)
    ]
    warm = [t for t in timings if t["data"] < 0.05]
    assert len(warm) >= 4  # the dataset was loaded once per worker


@pytest.mark.slow
def test_packs_train_what_fresh_processes_train(tmp_path, fresh_processes):
    # the same torch thread count as the reference's (cores / parallel there): float sums depend on it
    r = LocalRunner(parse_manifest(SMALL), tmp_path, parallel=1, threads=1, pack=3)
    status = r.run()
    assert status.phase == "Succeeded"
    assert outcome(r.root, status) == fresh_processes
    result = storage.read_json(f"{r.root}/epoch-0001/sample-02/result.json")
    assert result["pack"]["size"] == 3 and result["pack"]["samples"] == [0, 1, 2]


@pytest.mark.slow
def test_inline_trains_what_fresh_processes_train(tmp_path, fresh_processes):
    import torch

    threads = torch.get_num_threads()
    try:
        r = LocalRunner(parse_manifest(SMALL), tmp_path, threads=1, inline=True)
        status = r.run()
    finally:
        torch.set_num_threads(threads)
    assert status.phase == "Succeeded"
    assert outcome(r.root, status) == fresh_processes


@pytest.mark.slow
def test_a_worker_killed_mid_sample_is_replaced_and_the_search_ends_the_same(tmp_path, fresh_processes):
    events: list[tuple[str, dict]] = []

    def kill_once(kind: str, data: dict) -> None:
        events.append((kind, data))
        if (
            kind == "running"
            and data["epoch"] == 1
            and data["samples"] == [1]
            and not any(k == "killed" for k, _ in events)
        ):
            os.kill(data["pid"], signal.SIGKILL)
            events.append(("killed", {"pid": data["pid"]}))

    r = LocalRunner(
        parse_manifest(SMALL), tmp_path, parallel=2, worker=[sys.executable, "-c", SLOW_WORKER], on_event=kill_once
    )
    status = r.run()
    assert status.phase == "Succeeded"
    assert outcome(r.root, status) == fresh_processes
    killed = next(d["pid"] for k, d in events if k == "killed")
    workers = [d["pid"] for k, d in events if k == "worker"]
    assert len(workers) == 3 and killed in workers[:2]  # the dead one was replaced, once
    failed = [d for k, d in events if k == "sample-failed"]
    assert [(d["epoch"], d["sample"]) for d in failed] == [(1, 1)] and "signal 9" in failed[0]["message"]
    starts = [(d["epoch"], d["sample"], d["attempt"]) for k, d in events if k == "start"]
    assert (1, 1, 1) in starts  # retried as a failed attempt, as a killed trainer process would be


# --- what became of a sample (no processes) ---------------------------------------------------------------


def starts(runner: LocalRunner, n: int, attempt: int = 0) -> list[core.StartSample]:
    return [
        core.StartSample(0, i, attempt, [0.0] * 7, None, f"{runner.root}/epoch-0000/sample-{i:02d}") for i in range(n)
    ]


def task_of(runner: LocalRunner, group: list[core.StartSample], **state) -> tuple[Task, list[Proc]]:
    log = runner.dir / "t.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("a line\nRuntimeError: the last error\n")
    t = Task(0, 0, runner.invocation(group[0], "cpu", tuple(group[1:])), log, **state)
    return t, [Proc(0, a.sample, a.attempt, list(a.theta), t) for a in group]


def test_the_runner_reads_exits_and_deaths_as_the_core_expects(tmp_path):
    r = LocalRunner(parse_manifest(MANIFEST), tmp_path)
    group = starts(r, 3)

    def outcomes(**state) -> list[str | None]:
        _, procs = task_of(r, group, **state)
        return [o.outcome if (o := r._outcome(p)) is not None else None for p in procs]

    assert outcomes(ready=True, started=True) == [None, None, None]
    assert outcomes(ready=True, started=True, done={0}) == ["failed", None, None]  # reported, but no result.json
    assert outcomes(rc=0) == ["failed"] * 3
    assert outcomes(rc=2) == ["config-error"] * 3
    assert outcomes(rc=3) == ["failed"] * 3
    assert outcomes(rc=1) == ["failed"] * 3
    # a trainer that died: before it was ready (could not start), before the invocation began, while training
    assert outcomes(died=-9) == ["failed"] * 3
    assert outcomes(died=-9, ready=True) == ["preempted"] * 3
    assert outcomes(died=-9, ready=True, started=True, mode="sequential") == ["failed", "preempted", "preempted"]
    assert outcomes(died=-9, ready=True, started=True, mode="vectorized") == ["failed"] * 3
    assert outcomes(died=-9, ready=True, started=True) == ["failed"] * 3  # a process: progress unknown
    assert outcomes(died=-15, ready=True, started=True) == ["preempted"] * 3
    assert outcomes(died=1, ready=True, started=True, mode="sequential") == ["failed", "preempted", "preempted"]
    # members whose result.json exists are complete, whatever happened to the rest
    storage.write_json(f"{group[0].output}/result.json", {"status": "ok", "reward": 0.5, "theta": [0.0] * 7})
    got = outcomes(died=-9, ready=True, started=True, mode="sequential", done={0})
    assert got == ["succeeded", "failed", "preempted"]
    assert outcomes(rc=3, ready=True, started=True) == ["succeeded", "failed", "failed"]
    _, procs = task_of(r, group, rc=3)
    o = r._outcome(procs[1])
    assert o is not None and o.message == "exit code 3: RuntimeError: the last error"


class FakeSlot(Slot):
    def __init__(self, index: int) -> None:
        super().__init__(index, {}, "cpu", lambda kind, data: None)
        self.tasks: list[list[int]] = []

    def submit(self, task: Task) -> None:
        self.task = task
        self.tasks.append(task.samples)


def test_packs_are_spread_over_the_free_slots_and_retries_run_alone(tmp_path):
    r = LocalRunner(parse_manifest(MANIFEST), tmp_path, pack=3)
    r.slots = [FakeSlot(0), FakeSlot(1)]
    queue = starts(r, 4) + starts(r, 5, attempt=1)[4:]
    r.launch_all(queue)
    assert [s.tasks for s in r.slots] == [[[0, 1, 2]], [[3]]]  # ceil(5 / 2) = 3; the retry waits
    assert sorted(r.procs) == [0, 1, 2, 3]
    r = LocalRunner(parse_manifest(MANIFEST), tmp_path, pack=4)
    r.slots = [FakeSlot(0), FakeSlot(1)]
    r.launch_all(starts(r, 4))
    assert [s.tasks for s in r.slots] == [[[0, 1]], [[2, 3]]]
    # at the turn of an epoch a slot may still be busy with a task whose members have all reported
    r = LocalRunner(parse_manifest(MANIFEST), tmp_path, pack=4)
    r.slots = [FakeSlot(0), FakeSlot(1)]
    r.launch_all(starts(r, 1))
    r.slots[0].task.done.add(0)  # type: ignore[union-attr]
    r.launch_all(starts(r, 4)[1:])
    assert [s.tasks for s in r.slots] == [[[0]], [[1, 2]]]  # the rest waits for slot 0, not packed into slot 1
    r = LocalRunner(parse_manifest(MANIFEST), tmp_path, pack=4)
    r.slots = [FakeSlot(0), FakeSlot(1)]
    r.launch_all(starts(r, 2, attempt=1))
    assert [s.tasks for s in r.slots] == [[[0]], [[1]]]
    inv = r.procs[0].task.invocation
    assert inv.attempt == 1 and [m.sample for m in inv.members] == [0]


def test_a_result_is_read_with_its_validation_loss(tmp_path):
    """What every shell observes of a finished sample: reward, digest and the validation loss the core's blow-up
    check compares; an older result without one reads as None."""
    from amlfs import effects, storage

    root = f"file://{tmp_path}/root"
    uri = f"{root}/epoch-0001/sample-02/result.json"
    storage.write_json(uri, {"status": "ok", "reward": 0.5, "sha256": "ab", "valLoss": 2.25, "theta": [0.1]})
    got = effects.read_result(root, 1, 2, 0, [0.1])
    assert got is not None and (got.outcome, got.reward, got.sha256, got.val_loss) == ("succeeded", 0.5, "ab", 2.25)
    storage.write_json(uri, {"status": "ok", "reward": 0.5, "sha256": "ab", "theta": [0.1]})
    got = effects.read_result(root, 1, 2, 0, [0.1])
    assert got is not None and got.val_loss is None
