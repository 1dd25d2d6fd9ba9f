"""The trainer contract (amlfs.contract): one invocation, spelled as flags or AMLFS_* environment, read back the
same; the shells (runner, pods) spell exactly what the trainer parses. No torch."""

from __future__ import annotations

import json

import pytest

from amlfs import contract, core
from amlfs.contract import ConfigError, Invocation, Member
from amlfs.controller.pods import PodSettings, merge_template, trainer_env
from amlfs.spec import LossSearchSpec, parse_manifest
from amlfs.status import Checkpoint

FULL = Invocation(
    spec='{"search": {"epochs": 3}}',
    epoch=2,
    members=(
        Member(0, (0.0, 1.5), "s3://b/p/sample-00"),
        Member(3, (), "s3://b/p/sample-03", attempt=2),
    ),
    search="demo",
    namespace="ns",
    attempt=1,
    start="s3://b/p/epoch-0001/sample-01/checkpoint.pt",
    start_sha256="ab" * 32,
    device="cuda:1",
    pack_mode="vectorized",
    threads=3,
    cudnn_benchmark=True,
    metrics_port=9090,
    pushgateway="http://pgw:9091",
    cache_dir="/tmp/cache",
)
ONE = Invocation(spec="@/x/spec.json", epoch=0, members=(Member(4, (0.25,), "file:///w/s4"),))


@pytest.mark.parametrize("inv", [FULL, ONE], ids=["pack", "one"])
def test_argv_env_and_args_round_trip(inv):
    assert contract.from_argv(contract.to_argv(inv), {}) == inv
    assert contract.from_env(contract.to_env(inv)) == inv
    # half as flags, half from the environment: the same invocation
    env = contract.to_env(inv)
    argv = contract.to_argv(inv)
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    by_flag = {f.flag: f.env for f in contract.FIELDS}
    split = {f: v for i, (f, v) in enumerate(flags.items()) if i % 2}
    rest = {by_flag[f]: v for i, (f, v) in enumerate(flags.items()) if not i % 2}
    assert contract.from_argv([x for kv in split.items() for x in kv], rest) == inv
    assert set(env) <= contract.ENV_NAMES


def test_spellings():
    env = contract.to_env(ONE)
    assert env == {
        "AMLFS_SPEC": "@/x/spec.json",
        "AMLFS_EPOCH": "0",
        "AMLFS_SAMPLE": "4",
        "AMLFS_THETA": "[0.25]",
        "AMLFS_OUTPUT": "file:///w/s4",
    }  # a pack of one keeps the single-sample spelling; defaults are left out
    members = json.loads(contract.to_env(FULL)["AMLFS_MEMBERS"])
    assert members == [
        {"sample": 0, "theta": [0.0, 1.5], "output": "s3://b/p/sample-00"},
        {"sample": 3, "theta": [], "output": "s3://b/p/sample-03", "attempt": 2},
    ]
    assert [FULL.member_attempt(m) for m in FULL.members] == [1, 2]
    assert contract.to_env(FULL)["AMLFS_CUDNN_BENCHMARK"] == "1"
    assert contract.grouping_key("ns", "s", 2, 3) == {"namespace": "ns", "search": "s", "epoch": "2", "sample": "3"}


def test_flags_override_the_environment():
    env = contract.to_env(ONE) | {"AMLFS_DEVICE": "cuda", "AMLFS_THREADS": "8"}
    inv = contract.from_argv(["--device", "cpu"], env)
    assert inv.device == "cpu" and inv.threads == 8 and inv.members == ONE.members


@pytest.mark.parametrize(
    "env, message",
    [
        ({"AMLFS_EPOCH": "0", "AMLFS_SAMPLE": "0", "AMLFS_OUTPUT": "o"}, "--spec: missing"),
        ({"AMLFS_SPEC": "{}", "AMLFS_SAMPLE": "0", "AMLFS_OUTPUT": "o"}, "--epoch: missing"),
        ({"AMLFS_SPEC": "{}", "AMLFS_EPOCH": "x", "AMLFS_SAMPLE": "0", "AMLFS_OUTPUT": "o"}, "expected an integer"),
        ({"AMLFS_SPEC": "{}", "AMLFS_EPOCH": "-1", "AMLFS_SAMPLE": "0", "AMLFS_OUTPUT": "o"}, "must be >= 0"),
        ({"AMLFS_SPEC": "{}", "AMLFS_EPOCH": "0", "AMLFS_SAMPLE": "0"}, "--output: missing"),
        (
            {"AMLFS_SPEC": "{}", "AMLFS_EPOCH": "0", "AMLFS_SAMPLE": "0", "AMLFS_OUTPUT": "o", "AMLFS_THETA": "[1"},
            "JSON",
        ),
        ({"AMLFS_SPEC": "{}", "AMLFS_EPOCH": "0", "AMLFS_MEMBERS": "[]"}, "non-empty"),
        ({"AMLFS_SPEC": "{}", "AMLFS_EPOCH": "0", "AMLFS_MEMBERS": '[{"sample": 0}]'}, "output: missing"),
        ({"AMLFS_SPEC": "{}", "AMLFS_EPOCH": "0", "AMLFS_MEMBERS": '[{"sample": 0, "output": "o", "x": 1}]'}, ".x"),
        (
            {
                "AMLFS_SPEC": "{}",
                "AMLFS_EPOCH": "0",
                "AMLFS_MEMBERS": '[{"sample": 0, "output": "o"}]',
                "AMLFS_SAMPLE": "1",
            },
            "either",
        ),
        (
            {"AMLFS_SPEC": "{}", "AMLFS_EPOCH": "0", "AMLFS_SAMPLE": "0", "AMLFS_OUTPUT": "o", "AMLFS_PACK_MODE": "x"},
            "--pack-mode",
        ),
    ],
)
def test_malformed_invocations_are_one_line_config_errors(env, message):
    with pytest.raises(ConfigError) as info:
        contract.from_env(env)
    assert message in str(info.value) and "\n" not in str(info.value)


MANIFEST = {
    "apiVersion": "amlfs.io/v1alpha1",
    "kind": "LossSearch",
    "metadata": {"name": "tiny", "namespace": "ns"},
    "spec": {"task": {"dataset": "digits"}, "search": {"epochs": 3, "samplesPerEpoch": 2, "intervals": 2}},
}
START = core.StartSample(
    epoch=1,
    sample=1,
    attempt=2,
    theta=[0.5] * 5,
    start=Checkpoint(uri="file:///w/tiny/epoch-0000/sample-00/checkpoint.pt", sha256="cd" * 32),
    output="file:///w/tiny/epoch-0001/sample-01",
)


def test_the_runner_and_the_pods_spell_what_the_trainer_parses(tmp_path):
    from amlfs.runner import LocalRunner

    runner = LocalRunner(parse_manifest(MANIFEST), tmp_path, threads=2)
    cmd = runner.command(START, "cpu")
    inv = contract.from_argv(cmd[len(runner.trainer) :], {})
    assert (inv.epoch, inv.attempt, inv.start, inv.start_sha256, inv.device, inv.threads) == (
        1,
        2,
        START.start.uri,
        START.start.sha256,
        "cpu",
        2,
    )
    assert inv.members == (Member(1, (0.5,) * 5, START.output),)
    spec = LossSearchSpec.model_validate(MANIFEST["spec"])
    env = {e["name"]: e["value"] for e in trainer_env(spec, "tiny", "ns", START, PodSettings()) if "value" in e}
    pod_inv = contract.from_env(env)
    assert pod_inv.members == inv.members and (pod_inv.search, pod_inv.namespace) == ("tiny", "ns")
    assert LossSearchSpec.model_validate_json(pod_inv.spec) == spec


def test_a_pod_template_may_tune_the_trainer_but_not_redefine_its_work():
    pod = {
        "metadata": {"name": "p", "namespace": "n", "labels": {}},
        "spec": {"containers": [{"name": "trainer", "env": [{"name": "AMLFS_EPOCH", "value": "1"}]}]},
    }
    user = [{"name": k, "value": "x"} for k in ("AMLFS_DEVICE", "AMLFS_MEMBERS", "AMLFS_ATTEMPT", "AMLFS_THREADS", "X")]
    out = merge_template(pod, {"spec": {"containers": [{"name": "trainer", "env": user}]}})
    names = [e["name"] for e in out["spec"]["containers"][0]["env"]]
    assert names == ["AMLFS_EPOCH", "AMLFS_DEVICE", "AMLFS_THREADS", "X"]
