#!/usr/bin/env bash
# Sourced by the launchers: $1 = comma-separated GPU ids ("" or "cpu" for CPU).
# Sets CUDA_VISIBLE_DEVICES and LAUNCH (python, or torchrun with one process per GPU).
gpu_ids=${1:-}
if [[ -z "$gpu_ids" || "$gpu_ids" == "cpu" ]]; then
  export CUDA_VISIBLE_DEVICES=""
  LAUNCH=(python)
  DEVICE=cpu
else
  export CUDA_VISIBLE_DEVICES="$gpu_ids"
  IFS=',' read -r -a _ids <<< "$gpu_ids"
  NPROC=${#_ids[@]}
  DEVICE=cuda
  if (( NPROC > 1 )); then
    LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${TTI_MAX_RESTARTS:-0}")
  else
    LAUNCH=(python)
  fi
fi
if [[ -x .venv/bin/python && -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi
