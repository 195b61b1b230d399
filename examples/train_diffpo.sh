#!/usr/bin/env bash
# Launch a DiFFPO recipe with accelerate.
#
#   examples/train_diffpo.sh RECIPE.yaml [ACCELERATE_CONFIG] [trl-diffpo train flags...]
#
# ACCELERATE_CONFIG is a file or a name from examples/accelerate_configs/ (single_gpu, multi_gpu, zero2, zero3,
# zero2_offload, zero3_offload, multi_node_zero2); default: zero2. NUM_PROCESSES (default: the number of visible
# GPUs) and MAIN_PROCESS_PORT (default: 29500) are read from the environment. Examples:
#
#   examples/train_diffpo.sh examples/configs/llada_gsm8k_diffpo.yaml zero2
#   NUM_PROCESSES=1 examples/train_diffpo.sh examples/configs/llada_countdown_diffpo.yaml single_gpu --max_steps 20
#   examples/train_diffpo.sh examples/configs/tiny_cpu.yaml cpu      # 2 CPU processes (gloo) via torchrun
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
fi
recipe="$1"
shift
accelerate_config="${1:-zero2}"
if [[ $# -ge 1 && "$1" != --* ]]; then shift; else accelerate_config="zero2"; fi
port="${MAIN_PROCESS_PORT:-29500}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ ! -f "$recipe" ]]; then
    echo "train_diffpo.sh: recipe $recipe not found" >&2
    exit 2
fi

if [[ "$accelerate_config" == "cpu" ]]; then
    # accelerate's CPU launcher needs MPI for several processes; torchrun + gloo needs nothing (set use_cpu: true)
    exec torchrun --nproc_per_node "${NUM_PROCESSES:-2}" --master_port "$port" \
        -m trl_diffpo train --config "$recipe" "$@"
fi

if [[ -f "$accelerate_config" ]]; then
    config_file="$accelerate_config"
else
    config_file="$here/accelerate_configs/${accelerate_config}.yaml"
    if [[ ! -f "$config_file" ]]; then
        echo "train_diffpo.sh: unknown accelerate config '$accelerate_config'; choose one of:" >&2
        ls "$here/accelerate_configs" | sed 's/\.yaml$//; s/^/  /' >&2
        exit 2
    fi
fi

count_gpus() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --list-gpus | wc -l; else echo 1; fi
}
num_processes="${NUM_PROCESSES:-$(count_gpus)}"
if [[ "$num_processes" -lt 1 ]]; then num_processes=1; fi

exec accelerate launch --config_file "$config_file" --num_processes "$num_processes" --main_process_port "$port" \
    -m trl_diffpo train --config "$recipe" "$@"
