#!/usr/bin/env bash
# Installs trl-diffpo into .venv and runs the main job: the offline end-to-end DiFFPO demo on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
.venv/bin/trl-diffpo demo "$@"
