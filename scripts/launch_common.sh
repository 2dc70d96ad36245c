#!/usr/bin/env bash
# Sourced by the launchers: $1 = $gpu_ids, comma-separated GPU ids (one process per GPU), or
# "cpu" / "" for one CPU process, or "cpu:N" for N CPU processes under torchrun (gloo), which
# is how the tests run every launcher's torchrun branch.
# Sets CUDA_VISIBLE_DEVICES, DEVICE, NPROC, WORLD (processes on all nodes) and LAUNCH:
# python for one process, else torchrun with NPROC processes. Environment switches:
#   TTI_MAX_RESTARTS=N     torchrun restarts a failed group up to N times (resume from latest)
#   TTI_NNODES=K TTI_RDZV_ENDPOINT=host:port [TTI_RDZV_ID=name]
#                          multi-node: run the same launcher on every node
gpu_ids=${1:-}
if [[ -z "$gpu_ids" || "$gpu_ids" == cpu || "$gpu_ids" == cpu:* ]]; then
  export CUDA_VISIBLE_DEVICES=""
  NPROC=1
  if [[ "$gpu_ids" == cpu:* ]]; then NPROC=${gpu_ids#cpu:}; fi
  if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "\$gpu_ids '$gpu_ids': expected GPU ids (0,1,2,3), cpu, or cpu:N with N >= 1 processes" >&2
    exit 2
  fi
  DEVICE=cpu
else
  if ! [[ "$gpu_ids" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    echo "\$gpu_ids '$gpu_ids': expected GPU ids (0,1,2,3), cpu, or cpu:N with N >= 1 processes" >&2
    exit 2
  fi
  export CUDA_VISIBLE_DEVICES="$gpu_ids"
  IFS=',' read -r -a _ids <<< "$gpu_ids"
  NPROC=${#_ids[@]}
  DEVICE=cuda
fi
restarts=${TTI_MAX_RESTARTS:-0}
WORLD=$(( NPROC * ${TTI_NNODES:-1} ))
if [[ -n "${TTI_NNODES:-}" ]]; then
  : "${TTI_RDZV_ENDPOINT:?set TTI_RDZV_ENDPOINT=host:port (the first node) with TTI_NNODES}"
  # A new store per restart: agents count restarts apart (tti/infra/distributed.py, _join_group).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  LAUNCH=(torchrun --nnodes="$TTI_NNODES" --nproc_per_node="$NPROC" --rdzv-backend=c10d
          --rdzv-endpoint="$TTI_RDZV_ENDPOINT" --rdzv-id="${TTI_RDZV_ID:-tti}"
          --max-restarts="$restarts")
elif (( NPROC > 1 || restarts > 0 )); then
  LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="$restarts")
else
  LAUNCH=(python)
fi
_venv="$(dirname "${BASH_SOURCE[0]}")/../.venv"  # the repository's, wherever the caller is
if [[ -x "$_venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then source "$_venv/bin/activate"; fi

# run_training CONFIG RUN_IDX DATASET_PATH [--set key=value ...]: check the config for WORLD
# processes, the text encoder and (cuda) the listed GPUs in one process first (a mistake
# prints one line, before any data is packed or run directory made, not once per rank
# inside torchrun's report), then run tti.train under LAUNCH.
run_training() {
  local config=$1 run_idx=$2 dataset_path=$3
  shift 3
  local sets=(--set run.run_idx="$run_idx" --set data.root="$dataset_path" "$@")
  local check=(python -m tti.preflight --world-size "$WORLD" --nnodes "${TTI_NNODES:-1}"
               --device "$DEVICE")
  # $gpu_ids name the machine's GPUs (CUDA_VISIBLE_DEVICES is set to them above): the
  # check sees them all, to tell an id that is not there from one that is.
  if [[ "$DEVICE" == cuda ]]; then check=(env -u CUDA_VISIBLE_DEVICES "${check[@]}" --gpus "$gpu_ids"); fi
  "${check[@]}" --config "$config" "${sets[@]}" > /dev/null
  "${LAUNCH[@]}" -m tti.train --config "$config" --device "$DEVICE" "${sets[@]}"
}
