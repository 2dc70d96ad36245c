#!/usr/bin/env bash
# Export ground-truth and generated val images for FID / CLIP score / caption accuracy.
# Usage: bash gen_images_for_metrics.sh $gpu_ids $run_idx $pretrained_model_path [tti.export options]
#   e.g. bash gen_images_for_metrics.sh 0,1,2,3 0 results/coco64_ft_roberta_diffusion/0 --n 30000
#        bash gen_images_for_metrics.sh cpu:2 0 results/shapes32_diffusion/0 --n 1000
# $gpu_ids: comma-separated GPU ids (one process per GPU), "cpu" / "" (one CPU process) or
# "cpu:N" (N CPU processes, gloo).
# $pretrained_model_path: a checkpoint file, a run directory (its checkpoints/latest.pt) or a
# release folder (python -m tti.release: model.safetensors + config.json; same images).
# A checkpoint is loaded as data only: one that asks to run code is refused, in one line.
# Writes ./eval_data_run_${run_idx}/{gt,tti}/images/*.png, {gt,tti}/*_captions.json and
# export_info.json in the folder you call it from (or --out-dir); rerunning resumes.
# Then: python -m tti.evaluate eval_data_run_${run_idx}
set -euo pipefail
if (( $# < 3 )); then
  echo "usage: $0 \$gpu_ids \$run_idx \$pretrained_model_path [--n N --steps S --guidance G ...]" >&2
  exit 2
fi
# Run from the caller's folder (paths and the export folder are theirs), with tti importable.
repo=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
source "$repo/scripts/launch_common.sh" "$1"
model_path=$3
run_idx=$2; shift 3
# Missing or unsafe: one line here, not one per process inside torchrun's report.
python -m tti.preflight --checkpoint "$model_path" > /dev/null
# "--": torchrun would read a following "--n" as an abbreviation of its own options.
if [[ "${LAUNCH[0]}" == torchrun ]]; then LAUNCH+=(-m --); else LAUNCH+=(-m); fi
"${LAUNCH[@]}" tti.export --checkpoint "$model_path" --out-dir "eval_data_run_${run_idx}" \
  --device "$DEVICE" "$@"
