#!/usr/bin/env bash
# Set up a virtual environment (CPU build of torch) and run lint, type check and the tests.
# This is the README's test command; CI (.ci/run) calls it on a clean clone, then runs the
# long training-parity runs (`-m slow`) as well. Extra arguments go to pytest
# (`bash scripts/test.sh -m slow` runs the slow ones only).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch first and pinned: `pip install torch==2.13.0` takes the CPU wheel, where a bare
# `torch` requirement would pull a multi-GB CUDA build.
pip install --quiet --disable-pip-version-check torch==2.13.0
pip install --quiet --disable-pip-version-check -e ".[all,dev]"
ruff check .
mypy
python -m pytest -m "not slow" "$@"
