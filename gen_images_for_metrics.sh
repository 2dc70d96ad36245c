#!/usr/bin/env bash
# Export ground-truth and generated val images for FID / CLIP score / caption accuracy.
# Usage: bash gen_images_for_metrics.sh $gpu_ids $run_idx $pretrained_model_path [tti.export options]
#   e.g. bash gen_images_for_metrics.sh 0,1,2,3 0 results/coco64_ft_roberta/0 --n 30000
#        bash gen_images_for_metrics.sh cpu 0 results/shapes32_diffusion/0 --n 1000
# $gpu_ids: comma-separated GPU ids (one process per GPU), or "cpu" / "" for the CPU.
# $pretrained_model_path: a checkpoint file or a run directory (its checkpoints/latest.pt).
# Writes ./eval_data_run_${run_idx}/{gt,tti}/images/*.png, {gt,tti}/*_captions.json and
# export_info.json; rerunning resumes. Then: python -m tti.evaluate eval_data_run_${run_idx}
set -euo pipefail
if (( $# < 3 )); then
  echo "usage: $0 \$gpu_ids \$run_idx \$pretrained_model_path [--n N --steps S --guidance G ...]" >&2
  exit 2
fi
model_path=$(realpath -m -- "$3")  # before the cd below, so a relative path still works
cd "$(dirname "$0")"
source scripts/launch_common.sh "$1"
run_idx=$2; shift 3
# "--": torchrun would read a following "--n" as an abbreviation of its own options.
if [[ "${LAUNCH[0]}" == torchrun ]]; then LAUNCH+=(-m --); else LAUNCH+=(-m); fi
"${LAUNCH[@]}" tti.export --checkpoint "$model_path" --out-dir "eval_data_run_${run_idx}" \
  --device "$DEVICE" "$@"
