#!/usr/bin/env bash
# Train the alignDRAW baseline (paper sizes, 32x32) on MS-COCO 2014 captions.
# Usage: bash scripts/run_aligndraw_coco.sh $gpu_ids $run_idx $dataset_path [--set key=value ...]
#   e.g. bash scripts/run_aligndraw_coco.sh 0,1 0 /data/coco      ("" or cpu: run on the CPU)
# $dataset_path holds annotations/captions_{train,val}2014.json, train2014/ and val2014/.
# The run lives in results/coco32_aligndraw/$run_idx and resumes from its latest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
if (( $# < 3 )); then
  echo "usage: $0 \$gpu_ids \$run_idx \$dataset_path [--set key=value ...]" >&2; exit 2
fi
source scripts/launch_common.sh "$1"
run_idx=$2; dataset_path=$3; shift 3
"${LAUNCH[@]}" -m tti.train --config "${TTI_CONFIG:-configs/aligndraw_coco32.yaml}" --device "$DEVICE" \
  --set run.run_idx="$run_idx" --set data.root="$dataset_path" "$@"
