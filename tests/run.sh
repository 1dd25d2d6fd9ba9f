#!/usr/bin/env bash
# Install everything the tests need (from scratch on a fresh machine), check lint, format and types, then test.
#   bash tests/run.sh [pytest args]    the whole suite (what CI runs): control plane, services, everything
#   bash tests/run.sh --quick [args]   the quick lane: no control plane, no services, no slow tests (~2 min)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
if [[ "${1:-}" == "--quick" ]]; then
  quick=1
  shift
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"

# Lint, format and types fail the run before any test starts (config in pyproject.toml).
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy --no-error-summary

export PYTHONUNBUFFERED=1
if ((quick)); then
  exec .venv/bin/python -m pytest -q -m "not cluster and not slow" "$@"
fi

if [ -x tests/cluster/prereqs.sh ]; then
  tests/cluster/prereqs.sh   # apt packages and the cached Go builds of the control plane
fi
exec .venv/bin/python -m pytest -q "$@"
