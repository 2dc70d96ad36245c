#!/usr/bin/env bash
# Train the 64x64 UNet with a fine-tuned RoBERTa on MS-COCO 2014 captions.
# Usage: bash run_tti_64_coco_ft_roberta.sh $gpu_ids $run_idx $dataset_path [--set key=value ...]
#   e.g. bash run_tti_64_coco_ft_roberta.sh 0,1,2,3 0 /data/coco    # 4 GPUs, one process each
#        TTI_CONFIG=configs/coco32_cpu.yaml bash run_tti_64_coco_ft_roberta.sh cpu:2 0 data/coco
#                                                   # 2 CPU processes, the CPU-sized config
# $gpu_ids: comma-separated GPU ids, "cpu" (one process) or "cpu:N" (N processes, gloo).
# $dataset_path (from the folder you call from) holds annotations/captions_{train,val}2014.json,
# train2014/ and val2014/. The run lives in results/coco64_ft_roberta_diffusion/$run_idx and
# resumes from its latest checkpoint when launched again.
# TTI_CONFIG picks another config (e.g. configs/coco32_frozen_roberta.yaml or
# configs/coco32_cpu.yaml); the run folder is then results/<run.dataset>_<model.kind>/$run_idx.
set -euo pipefail
if (( $# < 3 )); then
  echo "usage: $0 \$gpu_ids \$run_idx \$dataset_path [--set key=value ...]" >&2; exit 2
fi
# Paths are read from the caller's folder, before the cd to the repository (TTI_CONFIG
# from the repository too, when the caller's folder has no such file).
dataset_path=$(realpath -m -- "$3")
if [[ -f "${TTI_CONFIG:-}" ]]; then TTI_CONFIG=$(realpath -- "$TTI_CONFIG"); fi
cd "$(dirname "$0")"
source scripts/launch_common.sh "$1"
run_idx=$2; shift 3
run_training "${TTI_CONFIG:-configs/coco64_ft_roberta.yaml}" "$run_idx" "$dataset_path" "$@"
