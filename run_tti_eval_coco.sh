#!/usr/bin/env bash
# Sample a trained run: a labelled grid and a denoising GIF for the given sentences.
# Usage: bash run_tti_eval_coco.sh $gpu_ids $run_idx ["a sentence" ...]
#   e.g. bash run_tti_eval_coco.sh 0 0 "A dog chasing after a human" "Bakery shop selling muffins"
#        TTI_CONFIG=configs/coco32_cpu.yaml bash run_tti_eval_coco.sh cpu 0 "A red bus"
# $gpu_ids: sampling is one process, on the first listed GPU, or on the CPU for "cpu" / "cpu:N".
# Samples the latest checkpoint of the run the training launcher made with the same config:
# results/<run.dataset>_<model.kind>/$run_idx of TTI_CONFIG (default configs/coco64_ft_roberta.yaml,
# i.e. results/coco64_ft_roberta_diffusion/$run_idx). TTI_RUN_DIR=<run folder> names it instead,
# or a release folder (python -m tti.release), which draws the same images.
# With no sentence, the run's own grid captions (sample.captions in its config) are drawn.
# Writes $TTI_OUT (default <run dir>/samples)/eval_grid.png and eval_denoise.gif.
# TTI_SAMPLE_ARGS passes options to python -m tti.sample, e.g. "--n 4 --steps 100 --guidance 3".
set -euo pipefail
if (( $# < 2 )); then
  echo "usage: $0 \$gpu_ids \$run_idx [\"a sentence\" ...]" >&2; exit 2
fi
# Paths in the environment are read from the caller's folder, before the cd to the repository
# (TTI_CONFIG from the repository too, when the caller's folder has no such file).
if [[ -n "${TTI_RUN_DIR:-}" ]]; then TTI_RUN_DIR=$(realpath -m -- "$TTI_RUN_DIR"); fi
if [[ -n "${TTI_OUT:-}" ]]; then TTI_OUT=$(realpath -m -- "$TTI_OUT"); fi
if [[ -f "${TTI_CONFIG:-}" ]]; then TTI_CONFIG=$(realpath -- "$TTI_CONFIG"); fi
cd "$(dirname "$0")"
source scripts/launch_common.sh "$1"
run_idx=$2; shift 2
run_dir=${TTI_RUN_DIR:-$(python -m tti.preflight --run-dir-only \
  --config "${TTI_CONFIG:-configs/coco64_ft_roberta.yaml}" --set run.run_idx="$run_idx")}
if [[ ! -f "$run_dir/checkpoints/latest.pt" && \
      ! ( -f "$run_dir/model.safetensors" && -f "$run_dir/config.json" ) ]]; then
  echo "$run_dir has no checkpoints/latest.pt: has that run saved a checkpoint yet? (TTI_CONFIG" \
       "names the training config, TTI_RUN_DIR the run folder or a release folder)" >&2; exit 1
fi
out=${TTI_OUT:-$run_dir/samples}
captions=()
for sentence in "$@"; do captions+=(--caption "$sentence"); done
read -r -a extra <<< "${TTI_SAMPLE_ARGS:-}"
python -m tti.sample --checkpoint "$run_dir" "${captions[@]}" --device "$DEVICE" \
  --out "$out/eval_grid.png" --gif "$out/eval_denoise.gif" "${extra[@]}"
