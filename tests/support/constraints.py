"""constraints.txt: the exact versions of everything `pip install -e ".[dev]"` installed, read from the running
environment's package metadata (no resolver, no index).

    python -m tests.support.constraints > constraints.txt

`closure()` is also what tests/test_images.py uses to check the file against the environment the tests ran in.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

PROJECT = "amlfs"
#: what installs the project rather than what it imports: the images replace their venv's pip and setuptools by
#: these pins (pip >= 25.3 has --build-constraint, which pins setuptools, pyproject's build backend, as well).
INSTALLERS = ("pip", "setuptools")

HEADER = """\
# The exact versions the test suite runs with: every package of `pip install -e ".[dev]"` (the `trainer` and
# `operator` extras, their dependencies, the dev tools) plus pip and setuptools, read from the tested
# environment's package metadata on Linux x86_64 with Python 3.11 (the platform of the images).
#   tests/run.sh:             pip install -c constraints.txt -e ".[dev]"
#   Dockerfile:               pip install -c constraints.txt --build-constraint constraints.txt ".[operator]"
#   trainer_image/Dockerfile: pip install -c constraints.txt --build-constraint constraints.txt ".[trainer]"
# tests/test_images.py fails when this file and the environment the tests ran in disagree.
#
# Regenerate after changing pyproject.toml's dependencies, or to move to newer versions (pip without -c picks
# the newest versions pyproject.toml allows):
#   python3.11 -m venv /tmp/fresh && /tmp/fresh/bin/pip install --upgrade pip setuptools
#   /tmp/fresh/bin/pip install -e ".[dev]" && /tmp/fresh/bin/python -m tests.support.constraints > constraints.txt
# then run the whole suite with the new pins: bash tests/run.sh
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """canonical name -> installed version of every distribution that the requirements ``roots`` (e.g.
    ``amlfs[operator]``) pull in here, extras and environment markers evaluated as pip does. The project itself
    is walked but not listed. Raises PackageNotFoundError for a requirement that is not installed."""
    found: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        extras = {""} | {canonical(e) for e in req.extras}
        new = {e for e in extras if (name, e) not in done}
        if not new:
            continue
        done |= {(name, e) for e in new}
        dist = md.distribution(req.name)
        if name != PROJECT:
            found[name] = dist.version
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in new):
                todo.append(sub)
    return dict(sorted(found.items()))


def render() -> str:
    pins = closure([f"{PROJECT}[dev]"])
    pins.update({canonical(n): md.version(n) for n in INSTALLERS})
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def read(text: str) -> dict[str, str]:
    """canonical name -> version of every `name==version` line of a constraints file."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            if not m:
                raise ValueError(f"not an exact pin: {line!r}")
            out[canonical(m[1])] = m[2]
    return out


if __name__ == "__main__":
    sys.stdout.write(render())
