#!/usr/bin/env bash
# Sourced by the launchers: $1 = comma-separated GPU ids ("" or "cpu" for CPU).
# Sets CUDA_VISIBLE_DEVICES, DEVICE and LAUNCH: python for one process, else torchrun with
# one process per listed GPU. Environment switches:
#   TTI_MAX_RESTARTS=N     torchrun restarts a failed group up to N times (resume from latest)
#   TTI_NNODES=K TTI_RDZV_ENDPOINT=host:port [TTI_RDZV_ID=name]
#                          multi-node: run the same launcher on every node
gpu_ids=${1:-}
if [[ -z "$gpu_ids" || "$gpu_ids" == "cpu" ]]; then
  export CUDA_VISIBLE_DEVICES=""
  NPROC=1
  DEVICE=cpu
else
  export CUDA_VISIBLE_DEVICES="$gpu_ids"
  IFS=',' read -r -a _ids <<< "$gpu_ids"
  NPROC=${#_ids[@]}
  DEVICE=cuda
fi
restarts=${TTI_MAX_RESTARTS:-0}
if [[ -n "${TTI_NNODES:-}" ]]; then
  : "${TTI_RDZV_ENDPOINT:?set TTI_RDZV_ENDPOINT=host:port (the first node) with TTI_NNODES}"
  # A new store per restart: agents count restarts apart (tti/distributed.py, _join_group).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  LAUNCH=(torchrun --nnodes="$TTI_NNODES" --nproc_per_node="$NPROC" --rdzv-backend=c10d
          --rdzv-endpoint="$TTI_RDZV_ENDPOINT" --rdzv-id="${TTI_RDZV_ID:-tti}"
          --max-restarts="$restarts")
elif (( NPROC > 1 || restarts > 0 )); then
  LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="$restarts")
else
  LAUNCH=(python)
fi
if [[ -x .venv/bin/python && -z "${VIRTUAL_ENV:-}" ]]; then source .venv/bin/activate; fi
