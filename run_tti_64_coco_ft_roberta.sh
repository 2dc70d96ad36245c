#!/usr/bin/env bash
# Train the 64x64 UNet with a fine-tuned RoBERTa on MS-COCO 2014 captions.
# Usage: bash run_tti_64_coco_ft_roberta.sh $gpu_ids $run_idx $dataset_path [--set key=value ...]
#   e.g. bash run_tti_64_coco_ft_roberta.sh 0,1,2,3 0 /data/coco
# $dataset_path holds annotations/captions_{train,val}2014.json, train2014/ and val2014/.
# TTI_CONFIG picks another config (e.g. configs/coco32_frozen_roberta.yaml).
set -euo pipefail
cd "$(dirname "$0")"
if (( $# < 3 )); then
  echo "usage: $0 \$gpu_ids \$run_idx \$dataset_path [--set key=value ...]" >&2; exit 2
fi
source scripts/launch_common.sh "$1"
run_idx=$2; dataset_path=$3; shift 3
"${LAUNCH[@]}" -m tti.train --config "${TTI_CONFIG:-configs/coco64_ft_roberta.yaml}" --device "$DEVICE" \
  --set run.run_idx="$run_idx" --set data.root="$dataset_path" "$@"
