"""`amlfs export` and `amlfs_trainer.exported_loss`: a finished search's loss in one's own training loop."""

from __future__ import annotations

import json

import pytest
import torch

from amlfs import core
from amlfs.cli import main
from amlfs.runner import LocalRunner
from amlfs.spaces import get_space
from amlfs.spec import parse_manifest
from amlfs_trainer import exported_loss
from amlfs_trainer.losses import build_loss


def finished(tmp_path, **search):
    doc = {
        "apiVersion": "amlfs.io/v1alpha1",
        "kind": "LossSearch",
        "metadata": {"name": "ex"},
        "spec": {
            "task": {"dataset": "digits", "trainLimit": 64, "batchSize": 32},
            "model": {"name": "mlp", "width": 8},
            "search": {"epochs": 2, "samplesPerEpoch": 2, "intervals": 3, **search},
        },
    }
    m = parse_manifest(doc)
    runner = LocalRunner(m, tmp_path / "runs", device="cpu", inline=True, threads=1)
    status = runner.run()
    assert status.phase == "Succeeded"
    return m.spec, status, runner


def test_the_exported_loss_is_the_loss_of_the_final_mu(tmp_path, capsys):
    spec, status, runner = finished(tmp_path, init={"preset": "softmax", "classBalance": 0.99})
    out = tmp_path / "loss.json"
    assert main(["export", str(runner.dir), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "amlfs-loss/v1" and doc["head"] == "linear" and doc["search"]["mu"] == status.mu
    want = core.program_for(spec, status.mu)
    assert doc["program"] == want and doc["program"]["classBalance"] == 0.99
    # the same from the storage URI, on standard output
    assert main(["export", runner.root]) == 0 and json.loads(capsys.readouterr().out)["program"] == want
    counts = [7, 5, 6, 8, 6, 7, 5, 6, 7, 7]
    criterion = exported_loss(out, class_counts=counts)
    logits, target = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    ref = build_loss(want, "linear", spec.model.scale, class_counts=counts)
    assert torch.equal(criterion(logits, target), ref(logits, target))
    assert criterion(logits, target).item() != pytest.approx(torch.nn.functional.cross_entropy(logits, target).item())
    with pytest.raises(ValueError, match="classBalance"):
        exported_loss(out)  # a class-balanced loss needs the class counts


def test_export_of_something_that_is_not_a_finished_search_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    assert main(["export", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "final/mu.json" in err and "storage root" in err
    with pytest.raises(ValueError, match="amlfs export"):
        exported_loss({"format": "something-else"})


def test_the_exported_loss_keeps_the_searched_logit_adjustment(tmp_path):
    spec, status, runner = finished(tmp_path, init={"preset": "softmax", "logitAdjustment": 1.0})
    names = get_space("amlfs").names(core.space_config(spec))
    assert names[-1] == "logit_adjust" and len(status.mu) == len(names) == 3 + 3
    out = tmp_path / "loss.json"
    assert main(["export", str(runner.dir), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    want = core.program_for(spec, status.mu)
    assert doc["program"] == want and doc["search"]["names"] == names and want["logitAdjust"] > 0
    counts = [9, 1, 6, 8, 6, 7, 5, 6, 7, 2]
    logits, target = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    got = exported_loss(out, class_counts=counts)(logits, target)
    assert torch.equal(got, build_loss(want, "linear", spec.model.scale, class_counts=counts)(logits, target))
    with pytest.raises(ValueError, match="logitAdjust"):
        exported_loss(out)  # the adjustment needs the class priors
