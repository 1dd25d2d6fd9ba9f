"""The LossSearch spec: examples are valid, bad input gives one line naming the field, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amlfs.cli import main
from amlfs.spec import LossSearchSpec, SpecError, load_manifest, spec_from_json, spec_to_json

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_examples_are_valid_and_bundled():
    assert {p.name for p in EXAMPLES} >= {"digits-quick.yaml", "cifar10-resnet20.yaml"}
    for p in EXAMPLES:
        m = load_manifest(p)
        assert m.metadata.name == p.stem
    from amlfs.cli import example_path

    assert example_path("digits-quick").read_text() == (REPO / "examples" / "digits-quick.yaml").read_text()


def test_spec_round_trips_through_json_with_camel_case():
    spec = load_manifest(REPO / "examples" / "cifar10-resnet20.yaml").spec
    text = spec_to_json(spec)
    assert '"samplesPerEpoch":8' in text and '"samplesPerPod":8' in text and "samples_per_epoch" not in text
    assert spec_from_json(text) == spec


def test_defaults_are_the_measured_ones():
    s = LossSearchSpec().search
    assert (s.space, s.parameterization, s.intervals, s.sigma, s.lr, s.elitism, s.mu_bound) == (
        "amlfs",
        "bounded",
        6,
        0.2,
        0.05,
        True,
        1.0,
    )
    assert (s.common_random_numbers, s.antithetic, s.reward) == (True, True, "accuracy")


def write(tmp_path: Path, spec_patch: dict | None = None, text: str | None = None) -> Path:
    doc = {
        "apiVersion": "amlfs.io/v1alpha1",
        "kind": "LossSearch",
        "metadata": {"name": "bad"},
        "spec": {"search": {"epochs": 1}},
    }
    for dotted, value in (spec_patch or {}).items():
        node = doc
        *parents, last = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    p = tmp_path / "bad.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(doc))
    return p


BAD = [
    ({"spec.task.dataset": "imagenet22k"}, "spec.task.dataset", "use one of"),
    ({"spec.model.name": "vgg99"}, "spec.model.name", "use one of"),
    ({"spec.search.space": "magic"}, "spec.search.space", "use one of"),
    ({"spec.search.epochs": 0}, "spec.search.epochs", ">= 1"),
    ({"spec.search.epochs": -3}, "spec.search.epochs", ">= 1"),
    ({"spec.search.intervals": 0}, "spec.search.intervals", ">= 1"),
    ({"spec.search.samplesPerEpoch": 1}, "spec.search.samplesPerEpoch", ">= 2"),
    ({"spec.search.sigma": 0}, "spec.search.sigma", "> 0"),
    ({"spec.search.sigma": -0.1}, "spec.search.sigma", "> 0"),
    ({"spec.search.lr": 0}, "spec.search.lr", "> 0"),
    ({"spec.search.minSamples": 9}, "minSamples", "samplesPerEpoch"),
    ({"spec.trainer.resources.gpu": 2}, "spec.trainer.resources.gpu", "<= 1"),
    ({"spec.trainer.samplesPerPod": 0}, "spec.trainer.samplesPerPod", ">= 1"),
    ({"spec.trainer.samplesPerPod": -2}, "spec.trainer.samplesPerPod", ">= 1"),
    ({"spec.trainer.samplesPerPod": 5}, "trainer.samplesPerPod (5) must not exceed", "search.samplesPerEpoch (4)"),
    ({"spec.search.sampelsPerEpoch": 4}, "spec.search.sampelsPerEpoch", "remove it"),
    ({"spec.storage.uri": "ftp://x/y"}, "spec.storage", "s3://bucket/prefix"),
    ({"spec.search.init.preset": "arcface"}, "spec", "model.head: cosine"),
    ({"spec.search.init.preset": "label-smoothing"}, "spec", "search.mode: selection-only"),
    ({"spec.search.init.preset": "focal"}, "spec", "not representable in the bounded parameterization"),
    (
        {"spec.search.init.preset": "gce", "spec.search.parameterization": "monotone"},
        "spec",
        "not representable in the monotone parameterization",
    ),
    ({"spec.search.init.q": 0}, "spec.search.init.q", "> 0"),
    ({"spec.search.init.classBalance": 1.0}, "spec.search.init.classBalance", "< 1"),
    (
        {"spec.task.kind": "verification", "spec.task.dataset": "casia-webface"},
        "spec.task",
        "pairs.file and pairs.imagesRoot are needed for verification on casia-webface",
    ),
    (
        {"spec.task.kind": "retrieval", "spec.task.heldOutClasses": 4, "spec.task.reward": "accuracy"},
        "spec.task",
        "reward accuracy is not a metric of a retrieval task; use mAP or rank1",
    ),
    (
        {"spec.task.kind": "verification", "spec.task.heldOutClasses": 4, "spec.task.reward": "mAP"},
        "spec.task",
        "reward mAP is not a metric of a verification task; use accuracy",
    ),
    ({"spec.task.reward": "rank1"}, "spec.task", "not a metric of a classification task"),
    (
        {"spec.task.kind": "retrieval", "spec.task.dataset": "imagefolder"},
        "spec.task",
        "dataset imagefolder has no retrieval layout; use one of",
    ),
    ({"spec.task.dataset": "market1501"}, "spec.task", "dataset market1501 has no classification layout"),
    (
        {"spec.task.kind": "verification", "spec.task.dataset": "market1501"},
        "spec.task",
        "has no verification layout",
    ),
    ({"spec.task.kind": "retrieval"}, "spec.task", "heldOutClasses must be at least 2 for retrieval on digits"),
    ({"spec.task.heldOutClasses": 3}, "spec.task", "heldOutClasses applies to open-set retrieval or verification"),
    (
        {"spec.task.kind": "retrieval", "spec.task.dataset": "market1501", "spec.task.heldOutClasses": 3},
        "spec.task",
        "heldOutClasses applies to open-set",
    ),
    (
        {"spec.task.kind": "retrieval", "spec.task.heldOutClasses": 4, "spec.search.reward": "accuracy+loss"},
        "spec",
        "search.reward accuracy+loss applies to classification only",
    ),
    (
        {"spec.task.kind": "verification", "spec.task.heldOutClasses": 4, "spec.task.pairs.file": "/p.txt"},
        "spec.task",
        "pairs applies to verification on casia-webface only",
    ),
    (
        {"spec.task.kind": "retrieval", "spec.task.heldOutClasses": 4, "spec.task.labelNoise.rate": 0.2},
        "spec.task",
        "labelNoise and imbalance apply to classification only",
    ),
    ({"spec.task.imageSize": [256]}, "spec.task", "imageSize [256] must be empty or [height, width]"),
    ({"spec.task.imageSize": [256, 4]}, "spec.task.imageSize[1]", ">= 8"),
    ({"spec.task.kind": "ranking"}, "spec.task.kind", "use one of"),
    ({"kind": "Pod"}, "kind", "LossSearch"),
    ({"metadata.name": "Bad_Name"}, "metadata.name", "lowercase"),
]


@pytest.mark.parametrize(
    ("patch", "field", "hint"), BAD, ids=[next(iter(b[0])) + "=" + str(next(iter(b[0].values()))) for b in BAD]
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, patch, field, hint):
    p = write(tmp_path, patch)
    work = tmp_path / "runs"
    assert main(["run", str(p), "--workdir", str(work), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("amlfs: error: ") and field in err and hint in err, err
    assert not work.exists()


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    p = write(tmp_path, text="apiVersion: amlfs.io/v1alpha1\nkind: LossSearch\nspec: [unclosed\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert "malformed YAML" in err and "line" in err and len(err.splitlines()) == 1


def test_missing_file_and_multi_document(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the manifest" in capsys.readouterr().err
    p = write(tmp_path, text="a: 1\n---\nb: 2\n")
    with pytest.raises(SpecError, match="exactly one LossSearch document"):
        load_manifest(p)


def test_console_script_exit_code(tmp_path):
    p = write(tmp_path, {"spec.search.samplesPerEpoch": 1})
    out = subprocess.run(
        [sys.executable, "-m", "amlfs.cli", "run", str(p), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"amlfs: error: {p}: spec.search.samplesPerEpoch: Input should be greater than or equal to 2 (got 1); "
        "use a value >= 2"
    ]


def test_reward_metric_names_what_the_reward_is():
    assert LossSearchSpec().reward_metric == "accuracy"
    assert LossSearchSpec.model_validate({"search": {"reward": "neg-val-loss"}}).reward_metric == "neg-val-loss"
    retrieval = {"kind": "retrieval", "heldOutClasses": 4}
    assert LossSearchSpec.model_validate({"task": retrieval}).reward_metric == "mAP"
    assert LossSearchSpec.model_validate({"task": retrieval | {"reward": "rank1"}}).reward_metric == "rank1"
    faces = {"kind": "verification", "dataset": "casia-webface", "pairs": {"file": "/p", "imagesRoot": "/lfw"}}
    assert LossSearchSpec.model_validate({"task": faces}).reward_metric == "accuracy"
