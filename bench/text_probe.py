"""Is the text side the binding bottleneck? A supervised probe of the frozen encoder's tokens.

The diffusion model gets attribute binding wrong ("a small blue square left of a large
yellow circle" drawn with the sizes or shapes swapped, or the objects in the wrong order).
This asks whether the information is there to be had: the same trainable text layers the
UNet uses (tti.models.backbones.unet.TextAdapter over the frozen MiniLM tokens), read out by 7 learned
queries, are trained *directly* to predict, from a two-object shapes caption, the colour,
shape and size of the left/top object, of the other object, and the axis (horizontal or
vertical). "joint" = all 7 right on val captions (held-out compositions included).
If the probe gets near 100% in a few hundred thousand captions, the frozen tokens carry
the binding and the weak, noisy signal the diffusion loss sends to the text layers is what
is slow; if it does not, the encoder is the bottleneck.

    python -m bench.text_probe --threads 1          # ~5 minutes on one core

`--linear-role` asks a narrower question of every hidden state of the frozen encoder (0 =
embeddings ... 6 = last): is "this colour word's object is the left/top one" *linearly*
readable from that one token? (L2-regularised logistic regression on the colour word's first
sub-token, fitted on train captions, scored on val.) That is the role a pixel's query must
find in the keys to put each object on its side, and a linear readout is what one
cross-attention layer has.

    python -m bench.text_probe --linear-role --threads 1   # ~2 minutes on one core

With `--checkpoint RUN`, the same linear probe reads a trained diffusion model instead: the
encoder tokens its UNet gets, the output of its trainable text layers (what cross-attention
reads), and the keys of each cross-attention block; and the same for a fresh, untrained
UNet of the same config (seed 0). Does the role survive the text layers?

    python -m bench.text_probe --linear-role --checkpoint results/shapes32_diffusion/0 --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from tti.data.shapes import COLOURS, SHAPES, SIZES, generate_examples
from tti.text.encoder import TextEncoder
from tti.text.source import PACKAGED_MINILM
from tti.models.backbones.layers import TextAdapter
from tti.infra.cli import run_cli

TARGETS = ("colour 1", "shape 1", "size 1", "colour 2", "shape 2", "size 2", "axis")
CLASSES = (len(COLOURS), len(SHAPES), len(SIZES)) * 2 + (2,)


def two_object_captions(n_images: int, split: str) -> tuple[list[str], torch.Tensor]:
    """Every caption of the two-object images among n_images, and long [N, 7] targets
    (objects[0] is the left/top one in the dataset's canonical scene)."""
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    captions, targets = [], []
    for ex in generate_examples(n_images, split, seed=0):
        if len(ex.scene.objects) != 2:
            continue
        a, b = ex.scene.objects
        y = [colours.index(a.colour), shapes.index(a.shape), sizes.index(a.size),
             colours.index(b.colour), shapes.index(b.shape), sizes.index(b.size),
             ("left of", "above").index(ex.scene.relation)]
        captions += ex.captions
        targets += [y] * len(ex.captions)
    return captions, torch.tensor(targets)


@torch.no_grad()
def encode(encoder: TextEncoder, captions: list[str], layer: int, length: int):
    """float [N, length, D] hidden states of `layer` (-1 = the last, what training uses),
    bool [N, length] mask."""
    tokens, masks = [], []
    for i in range(0, len(captions), 512):
        enc = encoder.tokenizer(captions[i:i + 512], padding="max_length", max_length=length,
                                truncation=True, return_tensors="pt")
        tokens.append(encoder.model(**enc, output_hidden_states=True).hidden_states[layer])
        masks.append(enc["attention_mask"].bool())
    return torch.cat(tokens), torch.cat(masks)


def colour_positions(tokenizer, captions: list[str], targets: torch.Tensor) -> list[tuple[int, int, float]]:
    """(caption index, token index of the colour word's first sub-token, label 1 = left/top
    object) for both objects of every two-object caption: entries 2i and 2i + 1 are caption i's."""
    colours = list(COLOURS)
    first_piece = {c: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c)[0]) for c in colours}
    out = []
    for i, caption in enumerate(captions):
        ids = tokenizer(caption)["input_ids"]
        for colour_index, label in ((targets[i][0], 1.0), (targets[i][3], 0.0)):
            out.append((i, ids.index(first_piece[colours[int(colour_index)]]), label))
    return out


@torch.no_grad()
def role_features(encoder: TextEncoder, captions: list[str], targets: torch.Tensor):
    """Hidden states of every layer at the first sub-token of each object's colour word.

    Returns float [layers + 1, 2N, D] and float [2N] labels (1 = the left/top object)."""
    where = colour_positions(encoder.tokenizer, captions, targets)
    feats = []
    for start in range(0, len(captions), 256):
        enc = encoder.tokenizer(captions[start:start + 256], padding=True, return_tensors="pt")
        states = torch.stack(encoder.model(**enc, output_hidden_states=True).hidden_states)  # [layers+1, B, L, D]
        feats += [states[:, i - start, pos] for i, pos, _ in where[2 * start:2 * (start + 256)]]
    return torch.stack(feats, 1), torch.tensor([label for _, _, label in where])


def linear_accuracy(x_train, y_train, x_val, y_val, l2: float = 1e-3) -> tuple[float, float]:
    """Train and val accuracy of an L2-regularised logistic regression (LBFGS, standardised inputs)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    w = torch.zeros(x_train.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x_train @ w + b, y_train) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return tuple(((x @ w + b > 0).float() == y).float().mean().item()
                     for x, y in ((x_train, y_train), (x_val, y_val)))


def linear_role_table(encoder: TextEncoder, train_images: int, val_images: int) -> None:
    train_x, train_y = role_features(encoder, *two_object_captions(train_images, "train"))
    val_x, val_y = role_features(encoder, *two_object_captions(val_images, "val"))
    print(f"linear role probe: {len(train_y)} train / {len(val_y)} val colour tokens of two-object captions")
    print("| hidden state | train | val |\n|---|---|---|")
    for layer in range(len(train_x)):
        acc_train, acc_val = linear_accuracy(train_x[layer], train_y, val_x[layer], val_y)
        name = "0 (embeddings)" if layer == 0 else f"{layer}" + (" (last)" if layer == len(train_x) - 1 else "")
        print(f"| {name} | {acc_train:.3f} | {acc_val:.3f} |", flush=True)


@torch.no_grad()
def model_role_features(model, unet, captions: list[str], targets: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """What a diffusion model's UNet reads, at each colour token: {"encoder tokens",
    "text layers", "keys <i>" per cross-attention block} -> float [2N, width], and labels."""
    blocks = [m for m in unet.modules() if hasattr(m, "kv_cross")]
    where = colour_positions(model.text.tokenizer, captions, targets)
    feats: dict[str, list] = {}
    for start in range(0, len(captions), 256):
        text = model.text(captions[start:start + 256])
        tokens = text.tokens.masked_fill(~text.mask[..., None], 0.0)
        context = unet.text_context(tokens, text.mask, text.mask[:, None, None, :])
        read = {"encoder tokens": tokens}
        if unet.text_adapter is not None:  # the text layers' channels come first in the context
            read["text layers"] = context[..., :unet.text_adapter.proj.out_features]
        for k, block in enumerate(blocks):
            read[f"keys {k}"] = block.kv_cross(context).chunk(2, dim=-1)[0]
        for i, pos, _ in where[2 * start:2 * (start + 256)]:
            for name, value in read.items():
                feats.setdefault(name, []).append(value[i - start, pos])
    return {k: torch.stack(v) for k, v in feats.items()}, torch.tensor([w[2] for w in where])


def checkpoint_role_table(path: str, train_images: int, val_images: int) -> None:
    from tti.models.backbones.unet import UNet
    from tti.models.text_to_image import load_for_inference

    model, cfg = load_for_inference(path, "cpu")
    if cfg.model.kind != "diffusion":
        raise SystemExit(f"--checkpoint: {path} is a {cfg.model.kind} model; this probe reads a UNet")
    torch.manual_seed(0)
    fresh = UNet(cfg.model.unet, cfg.data.image_size, model.text.dim).eval()
    train = two_object_captions(train_images, "train")
    val = two_object_captions(val_images, "val")
    print(f"linear role probe of {path} (encoder hidden state {cfg.text.hidden_layer}): "
          f"{2 * len(train[0])} train / {2 * len(val[0])} val colour tokens")
    print("| read at the colour token | trained UNet: val | untrained UNet: val |\n|---|---|---|")
    results = {}
    for name, unet in (("trained", model.image_model.backbone), ("untrained", fresh)):
        (x_train, y_train), (x_val, y_val) = (model_role_features(model, unet, *train),
                                              model_role_features(model, unet, *val))
        results[name] = {k: linear_accuracy(x_train[k], y_train, x_val[k], y_val)[1] for k in x_train}
    for k, acc in results["trained"].items():
        print(f"| {k} | {acc:.3f} | {results['untrained'][k]:.3f} |", flush=True)


class Probe(nn.Module):
    """TextAdapter (as in the UNet), then one learned query per target attends to its output."""

    def __init__(self, dim: int, width: int, layers: int, head_dim: int = 32):
        super().__init__()
        self.adapter = TextAdapter(dim, width, layers, head_dim)
        self.queries = nn.Parameter(0.02 * torch.randn(len(TARGETS), width))
        self.heads = nn.ModuleList(nn.Linear(width, k) for k in CLASSES)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """tokens: float [B, L, dim]; mask: bool [B, L] -> one float [B, classes] per target."""
        attn_mask = mask[:, None, None, :]
        h = self.adapter(tokens, attn_mask)[:, None]  # [B, 1, L, width]
        q = self.queries[None, None].expand(len(tokens), 1, -1, -1)
        read = F.scaled_dot_product_attention(q, h, h, attn_mask=attn_mask)[:, 0]
        return [head(read[:, i]) for i, head in enumerate(self.heads)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--val-images", type=int, default=800)
    parser.add_argument("--layer", type=int, default=-1,
                        help="encoder hidden state to probe: -1 = last (what training uses), 0 = embeddings")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--text-width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--linear-role", action="store_true",
                        help="only the per-layer linear probe of the left/top role (see the docstring)")
    parser.add_argument("--checkpoint", default=None,
                        help="with --linear-role: probe this diffusion run's text layers and keys")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.checkpoint:
        if not args.linear_role:
            raise SystemExit("--checkpoint goes with --linear-role")
        checkpoint_role_table(args.checkpoint, args.train_images // 2, args.val_images)
        print(f"total {time.perf_counter() - start:.0f} s")
        return
    encoder = TextEncoder(PACKAGED_MINILM)
    if args.linear_role:
        linear_role_table(encoder, args.train_images // 2, args.val_images)
        print(f"total {time.perf_counter() - start:.0f} s")
        return
    train_caps, train_y = two_object_captions(args.train_images, "train")
    val_caps, val_y = two_object_captions(args.val_images, "val")
    length = 2 + max(len(encoder.tokenizer(c)["input_ids"]) for c in train_caps + val_caps)
    x_train, m_train = encode(encoder, train_caps, args.layer, length)
    x_val, m_val = encode(encoder, val_caps, args.layer, length)
    print(f"{len(train_caps)} train / {len(val_caps)} val two-object captions; "
          f"{PACKAGED_MINILM} hidden state {args.layer}; probe = {args.text_layers} text layers "
          f"of width {args.text_width} + 7 query readouts; batch {args.batch}")
    probe = Probe(x_train.shape[-1], args.text_width, args.text_layers)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    print("| step | captions seen | train loss | joint (val) | " + " | ".join(TARGETS) + " |")
    print("|---" * (4 + len(TARGETS)) + "|")
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_train), (args.batch,))
        out = probe(x_train[idx], m_train[idx])
        loss = sum(F.cross_entropy(o, train_y[idx, i]) for i, o in enumerate(out))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                pred = torch.stack([o.argmax(1) for o in probe(x_val, m_val)], 1)
            right = pred == val_y
            per = " | ".join(f"{v:.3f}" for v in right.float().mean(0).tolist())
            print(f"| {step} | {step * args.batch} | {loss.item():.3f} | "
                  f"{right.all(1).float().mean():.3f} | {per} |", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)  # a damaged or unsafe checkpoint: one line, no traceback
