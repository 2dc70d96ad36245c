#!/bin/bash
# The command-line probes behind docs/robustness.md (issue 17), runnable on any checkout, old
# or new, so their outcomes can be compared:
#   bash scripts/robustness_probes.sh <checkout> <scratch folder>
# e.g. `git worktree add /tmp/old 65003ea && bash scripts/robustness_probes.sh /tmp/old /tmp/p`.
# Tiny CPU runs; prints, per probe, the exit status, how many stderr lines (and tracebacks)
# the user got, the last of them, and what changed on disk. Deletes and reuses <scratch>.
REPO=$1; W=$2
[ -d "$REPO/tti" ] && [ -n "$W" ] || { echo "usage: $0 <checkout> <scratch folder>" >&2; exit 2; }
rm -rf "$W"; mkdir -p "$W"; cd "$REPO" || exit 1
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES= PYTHONPATH="$REPO"
TINY=(--set data.shapes_train=96 --set data.shapes_val=16 --set data.num_workers=0
      --set "model.unet.channels=[16, 32]" --set "model.unet.attn_resolutions=[16]"
      --set "model.unet.self_attn_resolutions=[16]" --set model.unet.head_dim=16
      --set sample.steps=4 --set train.batch_size=16
      --set train.warmup_steps=2 --set train.log_every=1 --set train.sample_every=1000
      --set train.eval_samples=0 --set train.lr_decay=constant)
RUN=$W/results/shapes32_diffusion/0
train() { python -m tti.train --config configs/shapes32.yaml --device cpu --set "data.root=$W/shapes" \
          --set "run.results_dir=$W/results" "${TINY[@]}" "$@" >/dev/null 2>"${ERR:-$W/err}"; }
report() {
    echo "  exit $1; stderr: $(grep -acv '^\s*$' "$W/err") lines, tracebacks: $(grep -ac Traceback "$W/err")"
    echo "  last stderr line: $(grep -av '^\s*$' "$W/err" | tail -1 | cut -c1-300)"
}

echo "== P1 the quickstart config on a COCO folder (data.root=<a user's COCO>)"
python - "$W/coco" <<'PY'
import json, os, sys
from PIL import Image
root = sys.argv[1]
for split in ("train", "val"):
    os.makedirs(f"{root}/{split}2014")
    os.makedirs(f"{root}/annotations", exist_ok=True)
    images, annotations = [], []
    for i in (1, 2):
        name = f"COCO_{split}2014_{i:012d}.jpg"
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(f"{root}/{split}2014/{name}")
        images.append({"id": i, "file_name": name, "height": 48, "width": 64})
        annotations.append({"id": i, "image_id": i, "caption": f"a photo number {i}"})
    with open(f"{root}/annotations/captions_{split}2014.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
PY
digest() { (cd "$W/coco" && find . -type f | sort | xargs md5sum | md5sum); }
before=$(digest)
python -m tti.train --config configs/shapes32.yaml --device cpu --set "data.root=$W/coco" \
    --set "run.results_dir=$W/results_coco" "${TINY[@]}" --set train.steps=1 >/dev/null 2>"$W/err"
report $?
echo "  COCO folder unchanged: $([ "$before" == "$(digest)" ] && echo yes || echo NO)" \
     "($(find "$W/coco" -type f | wc -l) files, 6 before)"

echo "== P2 a second launch on a run directory while the first still trains"
ERR=$W/err_first train --set train.steps=60 --set train.ckpt_every=1 & first=$!
for _ in $(seq 600); do grep -q "^step 3 loss" "$RUN/log.txt" 2>/dev/null && break; sleep 0.2; done
start=$(date +%s)
train --set train.steps=60 --set train.ckpt_every=1; rc=$?
echo "  the first still ran when the second ended: $(kill -0 $first 2>/dev/null && echo yes || echo no);" \
     "the second ran $(( $(date +%s) - start ))s"
report $rc
kill -9 $(pgrep -P $first) $first 2>/dev/null; wait $first 2>/dev/null
rm -rf "$W/results"

echo "== P3 resume with changed settings: train.lr (applied), model.unet.channels (fixed), a renamed weight"
train --set train.steps=3 --set train.ckpt_every=3
train --set train.steps=5 --set train.ckpt_every=5 --set train.lr=5e-4
report $?
python - "$RUN" <<'PY'
import sys, torch, yaml
state = torch.load(sys.argv[1] + "/checkpoints/latest.pt", weights_only=True)
with open(sys.argv[1] + "/config.yaml") as f:
    saved = yaml.safe_load(f)["train"]["lr"]
lr = state["optimizer"]["param_groups"][0]["lr"]
print(f"  step {state['step']}: the optimizer's lr {lr}, config.yaml's train.lr {saved}")
PY
echo "  history.jsonl, last line: $(tail -1 "$RUN/history.jsonl" 2>/dev/null | cut -c1-240)"
train --set train.steps=6 --set "model.unet.channels=[16, 48]"
report $?
echo "  config.yaml's model.unet.channels now: $(grep -A2 '  channels:' "$RUN/config.yaml" | tr -d '\n ')"
python - "$RUN" <<'PY'
import sys, torch
path = sys.argv[1] + "/checkpoints/latest.pt"
state = torch.load(path, weights_only=True)
key = sorted(state["model"])[-1]
state["model"]["generator.renamed.weight"] = state["model"].pop(key)
torch.save(state, path)
print(f"  renamed {key} in latest.pt")
PY
train --set train.steps=6 --set train.ckpt_every=6
report $?

echo "== P4 a user's mistakes on the command line"
python -m tti.train --config configs/shapes32.yaml --set train.stpes=1 >/dev/null 2>"$W/err"
report $?
python -m tti.sample --checkpoint "$RUN" --caption "a red circle" --n 0 --device cpu \
    --out "$W/grid.png" >/dev/null 2>"$W/err"
report $?
