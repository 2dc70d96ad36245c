"""A run's checkpoint -> the folder a user shares: the weights as safetensors, the config as
JSON and a model card. Nothing in it can run code on the machine that opens it.

    python -m tti.release --checkpoint results/coco64_ft_roberta_diffusion/0 --out release/coco64
    python -m tti.release --checkpoint results/shapes32_diffusion/0 --out release/shapes32 \
        --eval-dir eval_data_run_0        # the card shows that export's tti.evaluate table

writes
    <out>/model.safetensors  the EMA weights (the model's own if the run kept none), and the
                             text encoder's if fine-tuned (a frozen one is not: text.name names it)
    <out>/config.json        {"format": "tti.release/1", "step", "images_seen", "weights",
                             "text_vocab" (alignDRAW's words), "config"}
    <out>/README.md          the model card: what it is, steps and images seen, the metrics of
                             --eval-dir, how to sample it, the command that made it, the config

`python -m tti.sample` and `tti.export --checkpoint <out>`, `gen_images_for_metrics.sh $gpu_ids
$run_idx <out>` and `TTI_RUN_DIR=<out> bash run_tti_eval_coco.sh` take the folder wherever they
take a checkpoint and draw the same images (fp32, same seed). docs/sharing.md: uploading it to
the Hugging Face Hub.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import yaml

from tti.config.registry import MODEL_KINDS, model_label, samplers
from tti.config.schema import Config
from tti.evaluate import markdown_table, read_json
from tti.infra.checkpoints import load_checkpoint
from tti.infra.cli import UserError, run_cli
from tti.infra.release_folder import RELEASE_FORMAT, write_release_files
from tti.models.text_to_image import model_from_state, trainable_state


class ReleaseError(UserError, ValueError):
    """A release cannot be made as asked; the message names the argument."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tti.release", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    p.add_argument("--out", required=True, help="the release folder to write")
    p.add_argument("--eval-dir", default=None,
                   help="an export of this checkpoint scored by tti.evaluate: its table goes in the card")
    args = p.parse_args(argv)
    if not os.path.exists(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such checkpoint file or run directory")
    if os.path.isdir(os.path.join(args.out, "checkpoints")):
        p.error(f"--out {args.out} is a run directory; write the release to a folder of its own")
    if args.eval_dir and not os.path.isfile(os.path.join(args.eval_dir, "metrics.json")):
        p.error(f"--eval-dir {args.eval_dir}: no metrics.json (run python -m tti.evaluate on it)")
    return args


def scored_export(eval_dir: str, step: int) -> str:
    """The tti.evaluate table of export `eval_dir`; ReleaseError unless it was made from the
    EMA weights of this checkpoint's step."""
    metrics = read_json(os.path.join(eval_dir, "metrics.json"))
    info = read_json(os.path.join(eval_dir, "export_info.json"))
    made_from = info.get("checkpoint_step")
    if made_from != step:
        raise ReleaseError(f"--eval-dir {eval_dir}: exported from step {made_from} (export_info."
                           f"json), the checkpoint is at step {step}; export and score this one")
    if not info.get("settings", {}).get("use_ema", True):
        raise ReleaseError(f"--eval-dir {eval_dir}: exported with --no-ema; the release holds "
                           f"the EMA weights")
    return markdown_table(metrics)


def release_meta(state: dict, cfg: Config) -> dict:
    """config.json: what rebuilds the model (config, vocabulary) and what it was trained for."""
    step = int(state["step"])
    return {"format": RELEASE_FORMAT, "step": step,
            "images_seen": step * cfg.train.batch_size,  # train.batch_size: the global batch
            "weights": "ema" if state.get("ema") else "model",
            "text_vocab": state.get("text_vocab"), "config": cfg.to_dict()}


def text_encoder_line(cfg: Config, fine_tuned: bool) -> str:
    if MODEL_KINDS.get(cfg.model.kind).text == "vocab" or cfg.text.name == "vocab":
        return "a word vocabulary of the training captions (its words are in config.json)"
    if fine_tuned:
        return f"`{cfg.text.name}`, fine-tuned (its weights are in model.safetensors)"
    return f"`{cfg.text.name}`, frozen (loaded by that name; not in this folder)"


def model_card(cfg: Config, meta: dict, weights: dict, parameters: int, table: str | None,
               command: str) -> str:
    """README.md of a release: Hub metadata, a summary table, metrics, use, provenance, config."""
    s, step = cfg.data.image_size, meta["step"]
    fine_tuned = any(k.startswith("text.") for k in weights)
    rows = [("model", f"{model_label(cfg)}; {parameters / 1e6:.2f}M image-model parameters"),
            ("text encoder", text_encoder_line(cfg, fine_tuned)),
            ("images", f"{s} x {s}, trained on {cfg.run.dataset}"),
            ("training", f"{step} steps, {meta['images_seen']} images seen "
                         f"(steps x train.batch_size {cfg.train.batch_size})"),
            ("weights", f"EMA (decay {cfg.train.ema_decay})" if meta["weights"] == "ema"
             else "the model's own (the run kept no EMA)")]
    if samplers(cfg):
        o = cfg.sample
        rows.append(("default sampling", f"{o.sampler}, {o.steps} steps, guidance {o.guidance:g}"))
    metrics = table or ("Not scored here: `bash gen_images_for_metrics.sh`, then `python -m "
                        "tti.evaluate`, then `python -m tti.release ... --eval-dir` adds the table.")
    return "\n".join([
        "---", "library_name: tti", "pipeline_tag: text-to-image",
        "tags:", "- text-to-image", f"- {cfg.model.kind}", "---", "",
        f"# {cfg.run.dataset} {cfg.model.kind}, step {step}", "",
        "A text-to-image model trained with tti. This folder holds data only: the weights as "
        "safetensors, the config as JSON.", "",
        "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        "## Metrics", "", metrics, "",
        "## Use", "", "From a checkout of tti (`pip install -r requirements.txt`), with this folder "
        "at `FOLDER`:", "", "```bash",
        'python -m tti.sample --checkpoint FOLDER --caption "a red bus on a street" --out grid.png',
        "bash gen_images_for_metrics.sh 0 0 FOLDER --n 30000   # the images FID and CLIP score read",
        "```", "",
        "The same seed draws the same images as the checkpoint this was made from (fp32).", "",
        "## Made by", "", "```bash", command, "```", "",
        "## Config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```",
        ""])


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    state = load_checkpoint(args.checkpoint)  # weights only: nothing in it runs
    table = scored_export(args.eval_dir, int(state["step"])) if args.eval_dir else None
    # Rebuilt and loaded as a sampler would: the release holds exactly the weights it samples with.
    model, cfg = model_from_state(state, args.checkpoint, "cpu")
    meta = release_meta(state, cfg)
    del state
    weights = trainable_state(model)
    parameters = sum(p.numel() for p in model.image_model.parameters())
    command = shlex.join(["python", "-m", "tti.release", *argv])
    write_release_files(args.out, weights, meta,
                        model_card(cfg, meta, weights, parameters, table, command))
    print(f"wrote {args.out}: model.safetensors ({len(weights)} tensors, {meta['weights']} "
          f"weights), config.json, README.md (step {meta['step']})")
    return args.out


if __name__ == "__main__":
    run_cli(main)
