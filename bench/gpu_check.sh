#!/usr/bin/env bash
# The GPU check (logic in bench/gpu_check.py): img/s, peak memory, TFLOP/s and MFU of the COCO
# configs, eager and compiled, DDP on every visible GPU; then the shapes long config's judge
# accuracy after a few minutes of training. About 10 minutes on one GPU.
#   bash bench/gpu_check.sh [--out bench/results/gpu_check_<device>.md]
#   bash bench/gpu_check.sh --dry-run        # CPU, tiny sizes: every part, in about a minute
# Offline by default (roberta-base from the local Hugging Face cache, else random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
exec python -m bench.gpu_check "$@"
