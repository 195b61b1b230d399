#!/usr/bin/env bash
# Installs trl-diffpo with its dev extras into .venv and runs the linter and the whole test suite (CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
.venv/bin/ruff check src tests benchmarks examples
.venv/bin/ruff format --check src tests benchmarks examples
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
