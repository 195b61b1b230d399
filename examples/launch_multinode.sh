#!/usr/bin/env bash
# Run a DiFFPO recipe on several machines with DeepSpeed ZeRO-2 (examples/accelerate_configs/multi_node_zero2.yaml).
# Run this same script on every machine. Under SLURM (one task per node: `srun --ntasks-per-node=1 ...`) the machine
# rank, machine count and main address come from SLURM; otherwise set them:
#
#   MACHINE_RANK=0 NUM_MACHINES=2 MAIN_PROCESS_IP=10.0.0.1 examples/launch_multinode.sh RECIPE.yaml [flags...]   # node 0
#   MACHINE_RANK=1 NUM_MACHINES=2 MAIN_PROCESS_IP=10.0.0.1 examples/launch_multinode.sh RECIPE.yaml [flags...]   # node 1
#
# GPUS_PER_MACHINE (default 8), MAIN_PROCESS_PORT (default 29500) and ACCELERATE_CONFIG (default: the multi-node
# ZeRO-2 file) are read from the environment. The global batch is per_device_train_batch_size x
# gradient_accumulation_steps x NUM_MACHINES x GPUS_PER_MACHINE completions and must be divisible by num_generations.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
fi
recipe="$1"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

machine_rank="${MACHINE_RANK:-${SLURM_NODEID:-0}}"
num_machines="${NUM_MACHINES:-${SLURM_NNODES:-1}}"
if [[ -z "${MAIN_PROCESS_IP:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MAIN_PROCESS_IP="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
fi
main_ip="${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP (the address of machine 0) or run under SLURM}"
gpus="${GPUS_PER_MACHINE:-8}"

exec accelerate launch \
    --config_file "${ACCELERATE_CONFIG:-$here/accelerate_configs/multi_node_zero2.yaml}" \
    --num_machines "$num_machines" --num_processes "$((num_machines * gpus))" \
    --machine_rank "$machine_rank" --main_process_ip "$main_ip" --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    -m trl_diffpo train --config "$recipe" "$@"
