#!/usr/bin/env bash
# Create .venv (if missing), install the CPU build of PyTorch and the package with its
# development extras, then run ruff and the tests. pytest's "no tests collected" fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
ruff check src tests bench
python -m pytest -q "$@"
