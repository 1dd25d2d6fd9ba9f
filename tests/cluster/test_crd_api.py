"""The generated LossSearch CRD against a real kube-apiserver: it installs, `kubectl explain` teaches the spec,
the API server applies the models' defaults, accepts the examples and rejects bad manifests with the messages
the models carry (schema bounds, enums, CEL rules, transition rules), and status is its own subresource."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from amlfs import crd
from amlfs.spec import LossSearchSpec, SpecError, immutable_paths, parse_manifest
from amlfs.status import Best, Condition, LossSearchStatus

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GROUP, VERSION, PLURAL = crd.GROUP, crd.VERSION, crd.PLURAL


@pytest.fixture(scope="module")
def losssearch_crd(cluster):
    """The CRD from crd.render_yaml(), applied and served. Left installed: other tests may use it, and
    re-applying the same manifest is a no-op."""
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=amlfs-test-crd",
        "-f",
        "-",
        input=crd.render_yaml(),
    )
    cluster.wait_crd(crd.CRD_NAME)
    custom = client.CustomObjectsApi(cluster.api_client)
    deadline = time.monotonic() + 30
    while True:  # discovery may lag Established by a moment
        try:
            custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
            break
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    return crd.CRD_NAME


def manifest(name: str = "ls", spec: dict | None = None) -> dict:
    m = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": name}}
    if spec is not None:
        m["spec"] = spec
    return m


def create(cluster, namespace: str, obj: dict, *extra: str):
    return cluster.kubectl("create", "-n", namespace, "-f", "-", *extra, input=json.dumps(obj), check=False)


def get(cluster, namespace: str, name: str) -> dict:
    return cluster.kubectl_json("get", f"{PLURAL}.{GROUP}", name, "-n", namespace)


def patch(cluster, namespace: str, name: str, body: dict, *extra: str):
    return cluster.kubectl(
        "patch", f"{PLURAL}.{GROUP}", name, "-n", namespace, "--type=merge", "-p", json.dumps(body), *extra, check=False
    )


def test_crd_is_established_with_names(cluster, losssearch_crd):
    got = cluster.kubectl_json("get", "crd", losssearch_crd)
    conds = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    assert conds.get("Established") == "True" and conds.get("NamesAccepted") == "True"
    assert got["status"]["acceptedNames"]["shortNames"] == ["lfs"]
    assert got["status"]["acceptedNames"]["categories"] == ["amlfs"]
    # the short name and the category resolve
    cluster.kubectl("get", "lfs", "-A")
    cluster.kubectl("get", "amlfs", "-A")


def test_kubectl_explain_teaches_the_spec(cluster, losssearch_crd):
    deadline = time.monotonic() + 30
    while True:  # the published OpenAPI may lag the CRD by a moment
        r = cluster.kubectl("explain", "losssearch.spec.search", check=False)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # explain wraps lines
    assert "The loss-function search itself." in out
    assert "samplesPerEpoch <integer>" in out and "B, samples of the loss per epoch." in out
    assert "Adam learning rate on mu." in out
    deep = " ".join(cluster.kubectl("explain", "lfs.spec.search.init.preset").stdout.split())
    assert "softmax (identity: plain cross-entropy), cosface, arcface, focal, gce" in deep
    top = " ".join(cluster.kubectl("explain", "losssearch").stdout.split())
    assert "AM-LFS loss-function search" in top


def test_api_server_applies_the_models_defaults(cluster, namespace, losssearch_crd):
    r = create(cluster, namespace, manifest("minimal"))
    assert r.returncode == 0, r.stderr
    spec = get(cluster, namespace, "minimal")["spec"]
    assert spec["search"]["samplesPerEpoch"] == 4
    assert spec["search"]["init"]["preset"] == "softmax"
    assert spec["optimizer"]["milestones"] == [0.5, 0.75]
    assert spec["trainer"]["resources"] == {"gpu": 1, "cpu": "4", "memory": "16Gi", "ephemeralStorage": "20Gi"}
    assert spec == LossSearchSpec().model_dump(mode="json", by_alias=True)

    # a partial nested object: the given fields stay, the rest is defaulted
    given = {"search": {"epochs": 3, "init": {"preset": "gce"}}, "model": {"width": 8}}
    r = create(cluster, namespace, manifest("partial", given))
    assert r.returncode == 0, r.stderr
    spec = get(cluster, namespace, "partial")["spec"]
    assert spec == LossSearchSpec.model_validate(given).model_dump(mode="json", by_alias=True)
    assert spec["search"]["epochs"] == 3 and spec["search"]["intervals"] == 6 and spec["model"]["width"] == 8


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted(cluster, namespace, losssearch_crd, path):
    r = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert r.returncode == 0, r.stderr


def _merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


#: (id, spec, name, expected message fragments): each is rejected by the API server AND by the models.
INVALID = [
    (
        "samples-per-epoch-1",
        {"search": {"samplesPerEpoch": 1}},
        None,
        ["spec.search.samplesPerEpoch must be at least 2 (B samples per epoch); set samplesPerEpoch: 2 or more"],
    ),
    (
        "intervals-0",
        {"search": {"intervals": 0}},
        None,
        ["spec.search.intervals must be between 1 and 64 (M pieces of t and tau); set intervals: 1 to 64"],
    ),
    ("intervals-65", {"search": {"intervals": 65}}, None, ["spec.search.intervals must be between 1 and 64"]),
    ("epochs-0", {"search": {"epochs": 0}}, None, ["spec.search.epochs must be at least 1; set epochs: 1 or more"]),
    (
        "sigma-0",
        {"search": {"sigma": 0}},
        None,
        ["spec.search.sigma must be greater than 0 (std of the sampling distribution); set e.g. sigma: 0.2"],
    ),
    ("sigma-negative", {"search": {"sigma": -0.5}}, None, ["spec.search.sigma must be greater than 0"]),
    ("search-lr-0", {"search": {"lr": 0}}, None, ["spec.search.lr must be greater than 0 (Adam learning rate on mu)"]),
    ("optimizer-lr-0", {"optimizer": {"lr": 0.0}}, None, ["spec.optimizer.lr must be greater than 0"]),
    (
        "min-samples-above-b",
        {"search": {"minSamples": 5, "samplesPerEpoch": 4}},
        None,
        [
            "spec.search.minSamples: Invalid value",
            "spec.search.minSamples must not exceed spec.search.samplesPerEpoch (an epoch could never close)",
        ],
    ),
    (
        "min-samples-above-default-b",
        {"search": {"minSamples": 5}},
        None,
        ["spec.search.minSamples must not exceed spec.search.samplesPerEpoch"],
    ),
    (
        "uri-http",
        {"storage": {"uri": "http://example.com/runs"}},
        None,
        ["spec.storage.uri must be empty, s3://bucket/prefix", "file:///path or an absolute path; fix the URI"],
    ),
    ("uri-relative", {"storage": {"uri": "runs/here"}}, None, ["spec.storage.uri must be empty, s3://bucket/prefix"]),
    ("uri-bad-bucket", {"storage": {"uri": "s3://UPPER/x"}}, None, ["spec.storage.uri must be empty"]),
    ("uri-empty-file", {"storage": {"uri": "file://"}}, None, ["spec.storage.uri must be empty"]),
    (
        "unknown-space",
        {"search": {"space": "genetic"}},
        None,
        ['spec.search.space: Unsupported value: "genetic"', 'supported values: "amlfs", "search-softmax"'],
    ),
    (
        "unknown-dataset",
        {"task": {"dataset": "imagenet"}},
        None,
        ['spec.task.dataset: Unsupported value: "imagenet"', '"cifar10"'],
    ),
    (
        "unknown-model",
        {"model": {"name": "vgg16"}},
        None,
        ['spec.model.name: Unsupported value: "vgg16"', '"resnet20"'],
    ),
    (
        "arcface-linear-head",
        {"search": {"init": {"preset": "arcface"}}},
        None,
        [
            "spec.search.init.preset: Invalid value",
            "spec.search.init.preset arcface needs spec.model.head: cosine; set model.head: cosine",
        ],
    ),
    (
        "softmax-space-cosface",
        {"search": {"space": "search-softmax", "init": {"preset": "cosface"}}},
        None,
        ["spec.search.init.preset must be softmax when spec.search.space is search-softmax"],
    ),
    (
        "label-smoothing-search",
        {"search": {"init": {"preset": "label-smoothing"}}},
        None,
        ["spec.search.init.preset label-smoothing is not a loss of the target probability"],
    ),
    (
        "gce-monotone",
        {"search": {"parameterization": "monotone", "init": {"preset": "gce"}}},
        None,
        ["spec.search.init.preset is not representable in spec.search.parameterization"],
    ),
    (
        "focal-bounded",
        {"search": {"init": {"preset": "focal"}}},
        None,
        ["spec.search.init.preset is not representable in spec.search.parameterization"],
    ),
    (
        "poly-term-monotone",
        {"search": {"parameterization": "monotone", "polyTerm": 2}},
        None,
        ["spec.search.polyTerm applies to the bounded parameterization of the amlfs space only"],
    ),
    (
        "poly-term-search-softmax",
        {"search": {"space": "search-softmax", "polyTerm": 0.5}},
        None,
        ["spec.search.polyTerm applies to the bounded parameterization"],
    ),
    ("poly-term-11", {"search": {"polyTerm": 11}}, None, ["spec.search.polyTerm", "less than or equal to 10"]),
    (
        "pairflip-half",
        {"task": {"labelNoise": {"type": "pairflip", "rate": 0.5}}},
        None,
        ["spec.task.labelNoise.rate must be below 0.5 for pairflip noise"],
    ),
    ("val-fraction-1", {"task": {"valFraction": 1.0}}, None, ["spec.task.valFraction", "should be less than 1"]),
    (
        "retrieval-reward-accuracy",
        {"task": {"kind": "retrieval", "heldOutClasses": 4, "reward": "accuracy"}},
        None,
        ["spec.task.reward is not a metric of a retrieval task; use mAP or rank1"],
    ),
    (
        "retrieval-on-imagefolder",
        {"task": {"kind": "retrieval", "dataset": "imagefolder"}},
        None,
        ["spec.task.dataset has no retrieval layout; use one of"],
    ),
    (
        "classification-on-market1501",
        {"task": {"dataset": "market1501"}},
        None,
        ["spec.task.dataset has no classification layout"],
    ),
    (
        "verification-without-pairs",
        {"task": {"kind": "verification", "dataset": "casia-webface"}},
        None,
        ["spec.task.pairs.file and spec.task.pairs.imagesRoot are needed for verification on casia-webface"],
    ),
    (
        "open-set-without-held-out-classes",
        {"task": {"kind": "retrieval"}},
        None,
        ["spec.task.heldOutClasses must be at least 2 for retrieval or verification on an in-memory dataset"],
    ),
    (
        "retrieval-search-reward",
        {"task": {"kind": "retrieval", "heldOutClasses": 4}, "search": {"reward": "neg-val-loss"}},
        None,
        ["spec.search.reward accuracy+loss and neg-val-loss apply to classification only"],
    ),
    ("seed-negative", {"search": {"seed": -1}}, None, ["spec.search.seed", "should be greater than or equal to 0"]),
    ("epochs-string", {"search": {"epochs": "ten"}}, None, ["spec.search.epochs", "must be of type integer"]),
    ("unknown-field", {"search": {"sampelsPerEpoch": 3}}, None, ['unknown field "spec.search.sampelsPerEpoch"']),
    ("name-too-long", {}, "x" * 41, ["metadata.name must be at most 40 characters"]),
]


@pytest.mark.parametrize("spec,name,expected", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_manifests_are_rejected_with_their_message(cluster, namespace, losssearch_crd, spec, name, expected):
    obj = manifest(name or "bad", spec)
    r = create(cluster, namespace, obj, "--dry-run=server")
    assert r.returncode != 0, f"accepted: {spec}"
    for fragment in expected:
        assert fragment in r.stderr, f"{fragment!r} not in:\n{r.stderr}"
    # the models (amlfs run, the operator's own parse) refuse it too
    with pytest.raises(SpecError):
        parse_manifest(obj)


def test_transition_rules_freeze_the_search_space(cluster, namespace, losssearch_crd):
    r = create(cluster, namespace, manifest("live", {"search": {"epochs": 5}}))
    assert r.returncode == 0, r.stderr
    frozen = [
        ({"search": {"intervals": 8}}, "spec.search.intervals is immutable once the LossSearch is created"),
        ({"search": {"space": "search-softmax"}}, "spec.search.space is immutable"),
        ({"search": {"parameterization": "paper"}}, "spec.search.parameterization is immutable"),
        ({"search": {"mode": "selection-only"}}, "spec.search.mode is immutable"),
        ({"search": {"seed": 7}}, "spec.search.seed is immutable"),
        ({"search": {"logitRange": 5}}, "spec.search.logitRange is immutable"),
        ({"search": {"init": {"margin": 0.5}}}, "spec.search.init is immutable"),
        ({"task": {"dataset": "mnist1d"}}, "spec.task is immutable"),
        ({"model": {"width": 64}}, "spec.model is immutable"),
        ({"search": {"reward": "neg-val-loss"}}, "spec.search.reward is immutable"),
        ({"search": {"antithetic": False}}, "spec.search.antithetic is immutable"),
        ({"search": {"commonRandomNumbers": False}}, "spec.search.commonRandomNumbers is immutable"),
        ({"search": {"priorAdjustment": False}}, "spec.search.priorAdjustment is immutable"),
        ({"search": {"polyTerm": 0}}, "spec.search.polyTerm is immutable"),
        ({"optimizer": {"name": "adamw"}}, "spec.optimizer.name is immutable"),
    ]
    # every field the runner refuses on resume is one of these (both read the markers in spec.py)
    assert {f"spec.{p}" for p in immutable_paths()} == {m.split(" is immutable")[0] for _, m in frozen}
    for change, message in frozen:
        r = patch(cluster, namespace, "live", {"spec": change})
        assert r.returncode != 0, f"allowed: {change}"
        assert message in r.stderr and "re-create the LossSearch" in r.stderr, r.stderr
    before = get(cluster, namespace, "live")
    assert before["spec"]["search"]["intervals"] == 6

    # what a user changes on a running search: more epochs, suspend/resume, the optimiser and trainers
    for change in (
        {"search": {"epochs": 20}},
        {"suspend": True},
        {"suspend": False},
        {"trainer": {"image": "amlfs-trainer:0.2.0"}},
        {"search": {"maxRetries": 5}},
        {"search": {"sigma": 0.1}},
        {"optimizer": {"lr": 0.05, "momentum": 0.8}},
    ):
        r = patch(cluster, namespace, "live", {"spec": change})
        assert r.returncode == 0, f"{change}: {r.stderr}"
    after = get(cluster, namespace, "live")
    assert after["spec"]["search"]["epochs"] == 20 and after["spec"]["suspend"] is False
    assert after["spec"]["trainer"]["image"] == "amlfs-trainer:0.2.0"
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    # the bounds still apply on update
    r = patch(cluster, namespace, "live", {"spec": {"search": {"epochs": 0}}})
    assert r.returncode != 0 and "spec.search.epochs must be at least 1" in r.stderr


def test_status_is_a_subresource(cluster, namespace, losssearch_crd):
    r = create(cluster, namespace, manifest("st", {"search": {"epochs": 7}}))
    assert r.returncode == 0, r.stderr
    obj = get(cluster, namespace, "st")
    status = LossSearchStatus(
        phase="Running",
        epoch=2,
        mu=[0.0, 0.1],
        sigma=0.2,
        best=Best(epoch=1, sample=3, reward=0.8125, checkpoint="s3://b/x/checkpoint.pt"),
        reward_metric="mAP",
        conditions=[
            Condition(
                type="Progressing",
                status="True",
                reason="Running",
                message="epoch 2 of 7",
                last_transition_time="2026-01-02T03:04:05Z",
                observed_generation=1,
            )
        ],
        observed_generation=obj["metadata"]["generation"],
    ).to_json_dict()
    r = patch(cluster, namespace, "st", {"status": status}, "--subresource=status")
    assert r.returncode == 0, r.stderr
    got = get(cluster, namespace, "st")
    assert got["spec"] == obj["spec"]
    assert got["metadata"]["generation"] == obj["metadata"]["generation"]  # status writes keep generation
    assert got["status"]["phase"] == "Running" and got["status"]["best"]["reward"] == 0.8125
    assert got["status"]["conditions"][0]["type"] == "Progressing"
    assert LossSearchStatus.model_validate(got["status"]).epoch == 2  # round-trips through the model

    # writing status through the main resource is ignored; spec through /status likewise
    r = patch(cluster, namespace, "st", {"spec": {"search": {"epochs": 9}}, "status": {"phase": "Failed"}})
    assert r.returncode == 0, r.stderr
    r = patch(
        cluster, namespace, "st", {"spec": {"search": {"epochs": 11}}, "status": {"epoch": 3}}, "--subresource=status"
    )
    assert r.returncode == 0, r.stderr
    got = get(cluster, namespace, "st")
    assert got["spec"]["search"]["epochs"] == 9
    assert got["status"]["phase"] == "Running" and got["status"]["epoch"] == 3

    # the status schema is enforced too
    r = patch(cluster, namespace, "st", {"status": {"phase": "Exploded"}}, "--subresource=status")
    assert r.returncode != 0 and 'status.phase: Unsupported value: "Exploded"' in r.stderr

    # the printer columns
    table = cluster.kubectl("get", "lfs", "st", "-n", namespace).stdout.split("\n")
    assert table[0].split() == ["NAME", "PHASE", "EPOCH", "EPOCHS", "BEST", "METRIC", "AGE"]
    assert table[1].split()[:6] == ["st", "Running", "3", "9", "0.8125", "mAP"]


def test_checked_in_manifest_is_what_the_test_applies():
    # the fixture applies render_yaml(); tests/test_crd.py pins it to crds/losssearch.yaml
    assert yaml.safe_load((ROOT / "crds" / "losssearch.yaml").read_text()) == crd.build_crd()
