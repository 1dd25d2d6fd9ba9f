#!/usr/bin/env bash
# Install everything the tests need (from scratch on a fresh machine), then run the whole suite.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"

if [ -x tests/cluster/prereqs.sh ]; then
  tests/cluster/prereqs.sh   # apt packages and the cached Go builds of the control plane
fi

export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q "$@"
