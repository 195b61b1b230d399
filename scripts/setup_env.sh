#!/usr/bin/env bash
# Creates .venv (if needed) and installs trl-diffpo into it from this checkout.
# Usage: source scripts/setup_env.sh [EXTRAS]    e.g. EXTRAS=dev
# torch is installed first and pinned to the CPU build available on this kind of machine; an unpinned torch would
# pull a multi-GB CUDA build. On a GPU machine install your CUDA torch first and skip this script.
set -euo pipefail
_extras="${1:-}"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$_root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==${TRL_DIFFPO_TORCH_VERSION:-2.13.0}"
fi
if [ -n "$_extras" ]; then _target=".[$_extras]"; else _target="."; fi
# deepspeed (dev extras) installs from its source archive: build none of its C++/CUDA ops ahead of time
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e "$_target"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
