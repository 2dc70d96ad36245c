#!/usr/bin/env bash
# The embedded default, end to end, offline: install, generate the shapes dataset, train
# the default config (GPU if there is one, else CPU), draw a sample grid + denoising GIF
# (held-out compositions included), and print the judge's caption accuracy on seen and
# held-out val captions. On 2 CPU cores in fp32: 15 min (Xeon) to ~29 (AMD EPYC, AVX2) (README).
#   bash scripts/quickstart.sh [--set key=value ...]     (extra args go to tti.train)
#   PRECISION=fp32 bash scripts/quickstart.sh      (train, sample and export in fp32: what a CPU
#                                                   without bf16 runs; default auto)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN_IDX=${RUN_IDX:-0}
N_EVAL=${N_EVAL:-300}
PRECISION=${PRECISION:-auto}
DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
RUN=results/shapes32_diffusion/$RUN_IDX
start=$(date +%s)

echo "== 1/4 train (configs/shapes32.yaml, device $DEVICE) -> $RUN"
# No grid + judge at the last step: steps 2 and 4 draw the grid and judge 300 right after.
python -m tti.train --config configs/shapes32.yaml --device "$DEVICE" --set run.run_idx="$RUN_IDX" \
  --set train.sample_at_end=false --set train.precision="$PRECISION" "$@"

echo "== 2/4 sample grid + denoising GIF (rows 1-4 seen compositions, rows 5-8 held out)"
# Grid and export take the config's sampler: DPM-Solver++(2M) in its flow form, 20 steps.
python -m tti.sample --checkpoint "$RUN" --n 8 --device "$DEVICE" --precision "$PRECISION" \
  --out "$RUN/quickstart_grid.png" --gif "$RUN/quickstart_denoise.gif"

echo "== 3/4 export $N_EVAL val captions -> eval_data_run_$RUN_IDX"
# Precision auto: bf16 where the hardware has it (~1.5x faster; pixels then depend on the
# batch by a level or two, so the export CLI's default fp32 is what reproducible exports use).
python -m tti.export --checkpoint "$RUN" --n "$N_EVAL" --out-dir "eval_data_run_$RUN_IDX" --device "$DEVICE" \
  --precision "$PRECISION"

echo "== 4/4 caption accuracy (the judge; gt = real val images, the ceiling)"
python -m tti.evaluate "eval_data_run_$RUN_IDX" --metrics judge --device "$DEVICE"

echo "quickstart finished in $(( ($(date +%s) - start) / 60 )) min: grid $RUN/quickstart_grid.png, GIF $RUN/quickstart_denoise.gif"
