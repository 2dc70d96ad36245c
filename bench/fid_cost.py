"""What FID during training (train.fid_every) costs, as a share of training time, from FLOPs.

For each config, torch.utils.flop_counter counts (matmuls and convolutions; attention through
SDPA's math kernel, whose matmuls it sees):
  training per image   the diffusion loss's forward + backward, plus the text encoder's
                       forward (frozen, run every step), forward + backward (fine-tuned) or
                       nothing (frozen with a text store: its states are read, not computed);
  sampling per image   sample.steps UNet forwards (two images' worth each under classifier-
                       free guidance), one encoder forward, one Inception forward at 299x299.
One FID check costs train.fid_samples sampled images; the training between two checks is
train.fid_every x train.batch_size images. Their ratio is the time FID adds to training if
sampling runs at the FLOP rate training does (both batched, same precision). The text
encoder's cost grows with the caption's token count (captions are padded to the longest of
the batch), so it is counted at two lengths, --tokens.

A RoBERTa-base-shaped encoder with random weights stands in for `roberta-base` (the FLOPs
depend on the shape only; no weights are downloaded).

    python -m bench.fid_cost                        # the four COCO configs, markdown table
    python -m bench.fid_cost --config configs/coco64_ft_roberta.yaml --set train.fid_every=10000
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tti.config.load import load_config
import tti.models  # noqa: F401  (registers the backbones and objectives)
from tti.config.registry import BACKBONES, OBJECTIVES
from tti.eval.metrics.fid import INCEPTION_SIZE, load_inception
from tti.models.diffusion import Diffusion
from tti.text.batch import TextBatch

COCO_CONFIGS = ["configs/coco32_frozen_roberta.yaml", "configs/coco32_ft_roberta.yaml",
                "configs/coco64_frozen_roberta.yaml", "configs/coco64_ft_roberta.yaml"]
TOKENS = [16, 64]  # a short COCO caption's batch; every caption at text.max_length=64


def count(fn) -> float:
    """FLOPs of fn() as torch.utils.flop_counter counts them."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        fn()
    return float(counter.get_total_flops())


def text_encoder(t) -> torch.nn.Module:
    """The encoder `t` (the config's text section) names, up to its text.hidden_layer, with
    gradients on: roberta-base's shape with random weights, else the model itself (offline:
    a folder or packaged-minilm)."""
    if t.name == "roberta-base":
        from transformers import RobertaConfig, RobertaModel
        config = RobertaConfig()
        config.num_hidden_layers = t.hidden_layer % (config.num_hidden_layers + 1)
        return RobertaModel(config, add_pooling_layer=False)
    from tti.text.encoder import TextEncoder
    return TextEncoder(t.name, hidden_layer=t.hidden_layer).model.requires_grad_(True)


def encoder_flops(encoder: torch.nn.Module, tokens: int, backward: bool) -> float:
    """The encoder's FLOPs for one caption of `tokens` tokens (forward, or forward + backward)."""
    ids = torch.full((2, tokens), 5, dtype=torch.long)

    def run():
        out = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        if backward:
            out.sum().backward()
    if backward:
        return count(run) / 2
    with torch.no_grad():
        return count(run) / 2


def unet_flops(cfg, context_dim: int, tokens: int) -> tuple[float, float]:
    """(one backbone forward, one training step's forward + backward) per image."""
    size = cfg.data.image_size
    backbone = BACKBONES.get(cfg.model.backbone).build(cfg, cfg.grid().channels, context_dim)
    diffusion = Diffusion(backbone, OBJECTIVES.get(cfg.model.objective).build(cfg))
    images = torch.rand(2, 3, size, size) * 2 - 1
    text = TextBatch(torch.randn(2, tokens, context_dim), torch.ones(2, tokens, dtype=torch.bool))
    train = count(lambda: diffusion.loss(images, text).backward()) / 2
    with torch.no_grad():
        forward = count(lambda: diffusion.backbone(images, torch.zeros(2), text)) / 2
    return forward, train


def inception_flops() -> float:
    with torch.no_grad():
        return count(lambda: load_inception("cpu")(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE)))


def rows_for(cfg, tokens_list: list[int], inception: float, encoder=None) -> list[dict]:
    """One row per (text-encoder setting, token count) of a config; `encoder`: the one
    text_encoder(cfg.text) returns, if made already."""
    encoder = encoder or text_encoder(cfg.text)
    s, tr = cfg.sample, cfg.train
    guided = 1 if s.guidance == 1.0 else 2
    modes = ["fine-tuned"] if cfg.text.finetune else ["frozen, text store", "frozen, run every step"]
    rows = []
    for tokens in tokens_list:
        forward, train = unet_flops(cfg, encoder.config.hidden_size, tokens)
        encode = encoder_flops(encoder, tokens, backward=False)
        sample = s.steps * guided * forward + encode + inception
        for mode in modes:
            if mode == "frozen, text store" and tokens != tokens_list[0]:
                continue  # the store makes the encoder free in training: one row is enough
            text_train = (encoder_flops(encoder, tokens, backward=True) if mode == "fine-tuned"
                          else encode if mode == "frozen, run every step" else 0.0)
            per_image = train + text_train
            fid_check = tr.fid_samples * sample
            between = tr.fid_every * tr.batch_size * per_image
            rows.append({"config": cfg.run.dataset, "encoder": mode, "tokens": tokens,
                         "train_gflop": per_image / 1e9, "sample_gflop": sample / 1e9,
                         "fid_tflop": fid_check / 1e12, "between_tflop": between / 1e12,
                         "share": fid_check / between if between else float("nan"),
                         "protocol": f"{tr.fid_samples} x {s.sampler} {s.steps}"
                                     f"{' + CFG' if guided == 2 else ''}, every {tr.fid_every}"
                                     f" x {tr.batch_size}"})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| config | text encoder in training | tokens | train GFLOP/img | sample GFLOP/img "
            "| FID check | one check (TFLOP) | training between checks (TFLOP) | FID / training |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['config']} | {r['encoder']} | {r['tokens']} | {r['train_gflop']:.1f} | "
        f"{r['sample_gflop']:.0f} | {r['protocol']} | {r['fid_tflop']:.0f} | "
        f"{r['between_tflop']:.0f} | {100 * r['share']:.1f}% |\n" for r in rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fid_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None, help="default: the COCO configs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every config (repeatable)")
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="caption lengths")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    inception = inception_flops()
    rows = []
    for path in args.config or COCO_CONFIGS:
        cfg = load_config(path, args.set)
        if cfg.train.fid_every == 0:
            p.error(f"{path}: train.fid_every is 0 (FID off); pass --set train.fid_every=N")
        rows += rows_for(cfg, args.tokens, inception)
    table = markdown(rows)
    print(f"Inception forward: {inception / 1e9:.2f} GFLOP per image\n\n{table}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
