#!/usr/bin/env bash
# One prepared GPU check (issue 15): everything worth measuring on a short GPU loan, in one run of under 8 minutes on
# one H100/H200-class GPU, installation included. Random bf16 weights at LLaDA-8B shape; nothing is downloaded.
#
#   1. install what the GPU image lacks from .whl/ (prepare it here with `bash ../shared/device/prepare-wheels.sh`);
#   2. decoding benchmark (benchmarks/bench_generation.py, d1's rollout shape), the CACHE_MODES interleaved;
#   3. one training step configuration (benchmarks/bench_trainer.py: two-stage surrogate + token IS + sampler head,
#      LoRA r=128, gradient checkpointing) with time per phase and peak memory;
#   4. the native LLaDA forward in bf16 vs float32: log-prob error (benchmarks/bench_precision.py).
#
# Usage (repository root):
#   OUT=/some/folder bash benchmarks/gpu_check.sh          # on the GPU machine; results under $OUT (default gpu_check/)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh       # CPU: the same steps at tiny sizes, no install (tested)
# Knobs (environment): CACHE_MODES (default "none prefix dual", run interleaved, ratios to the first),
# GEN_SAMPLERS (default low_confidence), BUDGET_S (default 450: every step's timeout is cut to what is left).
# Each step writes <name>.log and its JSON under $OUT; summary.md lists every step with its exit code and time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check}"
mkdir -p "$OUT"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
BUDGET_S="${BUDGET_S:-450}"
PYTHON="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DS_BUILD_OPS=0
START_S=$SECONDS
SUMMARY="$OUT/summary.md"
printf '# gpu_check %s (dry run: %s)\n\n| step | exit | seconds |\n|---|---|---|\n' "$(date -u +%FT%TZ)" "$DRY_RUN" \
  > "$SUMMARY"

# step NAME CAP_S COMMAND...: run COMMAND with a timeout of min(CAP_S, what is left of BUDGET_S), log it, record it.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET_S - (SECONDS - START_S)))
  local limit=$((cap < left ? cap : left))
  local begin=$SECONDS rc
  if ((limit < 10)); then
    echo "| $name | skipped (budget spent) | 0 |" >> "$SUMMARY"
    return 0
  fi
  echo "== $name (timeout ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc$([ "$rc" = 124 ] && echo ' (timeout)') | $((SECONDS - begin)) |" >> "$SUMMARY"
  tail -n 25 "$OUT/$name.log"
  return 0
}

# -- 1. environment -----------------------------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu
  GEN_SIZE=(--size tiny --dtype float32 --batch 2 --prompt-len 16 --gen-len 16 --block 8 --repeats 1)
  TRAINER_SIZE=(--size tiny --batch 2 --num-generations 2 --prompt-len 16 --gen-len 16 --block 8 --max-steps 1)
  PRECISION_SIZE=(--size small --batch 1 --prompt-len 16 --gen-len 16)
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  DEVICE=cuda
  # the wheels of prepare-wheels.sh (trl, datasets, transformers 5.23, ...); no step here uses deepspeed, whose source
  # archive a ZeRO step would add with: pip install --no-index --no-deps --no-build-isolation --target .site \
  # .whl/deepspeed-*.tar.gz
  if [ -d .whl ] && ! PYTHONPATH="$PWD/.site" "$PYTHON" -c "import trl, datasets" > /dev/null 2>&1; then
    step install 180 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site \
      .whl/*.whl
  fi
  export PYTHONPATH="$PWD/.site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  # d1's rollout shape: 8 completions of 256 tokens after 256 prompt tokens, blocks of 32, 128 steps
  GEN_SIZE=(--size llada8b --dtype bfloat16 --batch 8 --prompt-len 256 --gen-len 256 --block 32 --repeats 1)
  # the head needs an adaptive sampler: entropy-bounded at 2 ln(V) commits about 2 tokens per step on random weights
  TRAINER_SIZE=(--size llada8b --dtype bfloat16 --batch 8 --num-generations 8 --prompt-len 256 --gen-len 128
    --block 32 --gradient-checkpointing --max-steps 2)
  PRECISION_SIZE=(--size llada8b --batch 4 --prompt-len 256 --gen-len 256)
fi
{
  nvidia-smi 2> /dev/null || echo "no nvidia-smi"
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  git rev-parse HEAD 2> /dev/null
} > "$OUT/environment.txt" 2>&1

# -- 2. decoding, the cache modes interleaved in one process (ratios to the first) -------------------------------
read -r -a CACHE_MODE_LIST <<< "${CACHE_MODES:-none prefix dual}"
read -r -a GEN_SAMPLER_LIST <<< "${GEN_SAMPLERS:-low_confidence}"
step generation 240 "$PYTHON" benchmarks/bench_generation.py --device "$DEVICE" "${GEN_SIZE[@]}" \
  --samplers "${GEN_SAMPLER_LIST[@]}" --cache "${CACHE_MODE_LIST[@]}" --json "$OUT/generation.json"

# -- 3. one training step configuration ---------------------------------------------------------------------------
step trainer 200 "$PYTHON" benchmarks/bench_trainer.py --device "$DEVICE" "${TRAINER_SIZE[@]}" \
  --likelihoods two_stage --samplers entropy_bounded --head on --finetune lora --output "$OUT/trainer.json"

# -- 4. bf16 vs float32 log-probs ---------------------------------------------------------------------------------
step precision 120 "$PYTHON" benchmarks/bench_precision.py --device "$DEVICE" "${PRECISION_SIZE[@]}" \
  --json "$OUT/precision.json"

echo "total: $((SECONDS - START_S)) s" | tee -a "$SUMMARY"
cat "$SUMMARY"
