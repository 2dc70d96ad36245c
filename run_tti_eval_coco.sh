#!/usr/bin/env bash
# Sample a trained run: a labelled grid and a denoising GIF for the given sentences.
# Usage: bash run_tti_eval_coco.sh $gpu_ids $run_idx ["a sentence" ...]
#   e.g. bash run_tti_eval_coco.sh 0 0 "A dog chasing after a human" "Bakery shop selling muffins"
#        bash run_tti_eval_coco.sh cpu 0 "a small red circle above a large blue square"
# Uses the latest checkpoint of results/<dataset>_<model>/$run_idx (found by run index; if
# several runs share it, set TTI_RUN_DIR=results/<dataset>_<model>/$run_idx). With no sentence,
# the run's own grid captions (sample.captions in its config) are drawn.
# Writes $TTI_OUT (default <run dir>/samples)/eval_grid.png and eval_denoise.gif.
# TTI_SAMPLE_ARGS passes options to python -m tti.sample, e.g. "--n 4 --steps 100 --guidance 3".
set -euo pipefail
# Paths in the environment are taken from where the script is called, before the cd.
if [[ -n "${TTI_RUN_DIR:-}" ]]; then TTI_RUN_DIR=$(realpath -m -- "$TTI_RUN_DIR"); fi
if [[ -n "${TTI_OUT:-}" ]]; then TTI_OUT=$(realpath -m -- "$TTI_OUT"); fi
cd "$(dirname "$0")"
if (( $# < 2 )); then
  echo "usage: $0 \$gpu_ids \$run_idx [\"a sentence\" ...]" >&2; exit 2
fi
source scripts/launch_common.sh "$1"
run_idx=$2; shift 2
if [[ -n "${TTI_RUN_DIR:-}" ]]; then
  run_dir=$TTI_RUN_DIR
else
  shopt -s nullglob
  matches=(results/*/"$run_idx")
  if (( ${#matches[@]} == 0 )); then
    echo "no run with index $run_idx under results/*/ (set TTI_RUN_DIR to the run folder)" >&2; exit 1
  elif (( ${#matches[@]} > 1 )); then
    echo "several runs have index $run_idx:" >&2
    printf '  %s\n' "${matches[@]}" >&2
    echo "set TTI_RUN_DIR to the one to sample, e.g. TTI_RUN_DIR=${matches[0]} $0 $*" >&2; exit 1
  fi
  run_dir=${matches[0]}
fi
if [[ ! -f "$run_dir/checkpoints/latest.pt" ]]; then
  echo "$run_dir has no checkpoints/latest.pt (has the run saved a checkpoint yet?)" >&2; exit 1
fi
out=${TTI_OUT:-$run_dir/samples}
captions=()
for sentence in "$@"; do captions+=(--caption "$sentence"); done
read -r -a extra <<< "${TTI_SAMPLE_ARGS:-}"
# Sampling is one process: a single GPU (the first of $gpu_ids) or the CPU.
python -m tti.sample --checkpoint "$run_dir" "${captions[@]}" --device "$DEVICE" \
  --out "$out/eval_grid.png" --gif "$out/eval_denoise.gif" "${extra[@]}"
