"""Training throughput: our UNet against diffusers' UNet2DConditionModel, and the text cache.

One training step = forward + backward + AdamW step on a batch of noisy images with text
tokens, under the same precision for both (fp32, or bf16 autocast: what `train.precision:
auto` picks on CUDA and on bf16-capable CPUs). Ours is the UNet of configs/shapes32.yaml
(or --config, with --set overrides). The UNets are measured in the same run,
alternating step by step, so a shared machine slows both alike: compare the ratio.
The diffusers model is the one, among a small grid of widths, whose parameter count is
closest to ours (same levels, cross-attention at the same resolutions, one res block per
level, cross_attention_dim = our context_dim, head width 32).

On CPU in bf16, a third row times our UNet with attention left to SDPA's default kernel
instead of the explicit path (matmul, masked softmax, matmul) that tti.models.backbones.unet.attention takes
when training on CPU in bf16/fp16 (the ablation of that choice). When our UNet narrows its
upsampling (model.unet.narrow_upsample), a further row times it with that option off.

Then, with the real frozen encoder (TextEncoder("packaged-minilm") at the config's
text.hidden_layer), a full Diffusion.loss step with the text from the text store and from
the live encoder, and the encoder's share of the step (bench/text_store.py does the same for
the COCO config, with the store's size and memory per rank).

Run from the repository root (diffusers is a bench-only dependency, see requirements-dev.txt):
    python -m bench.train_throughput                       # CPU: fp32 and bf16, ~4 minutes
    python -m bench.train_throughput --device cuda --batch 256 --steps 20 --warmup 5 --compile
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import random
import statistics
import time

import torch
import torch.nn as nn

import tti.models.backbones.unet
from tti.config.load import load_config
from tti.models.diffusion import Diffusion
from tti.infra.precision import amp_dtype, precision_name
from tti.models.backbones.unet import UNet
from tti.models.objectives.gaussian import GaussianDiffusion
from tti.text.batch import TextBatch
from tti.text.encoder import TextEncoder
from tti.text.source import PACKAGED_MINILM
from tti.infra.threads import use_free_cpus
from tti.training.utilisation import peak_tflops, train_flops_per_image

HEAD_DIM = 32


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def diffusers_unet(widths: tuple[int, ...], size: int, context_dim: int) -> nn.Module:
    """UNet2DConditionModel shaped like ours: cross-attention on every level but the first."""
    from diffusers import UNet2DConditionModel

    groups = math.gcd(32, *widths)  # GroupNorm groups must divide every width

    levels = len(widths)
    return UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=widths,
        layers_per_block=1, cross_attention_dim=context_dim,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        # diffusers reads this legacy argument as the number of heads per block.
        attention_head_dim=tuple(max(1, w // HEAD_DIM) for w in widths),
        norm_num_groups=groups,
    )


def matched_diffusers_unet(target_params: int, first_width: int, levels: int, size: int,
                           context_dim: int):
    """The diffusers UNet whose parameter count is closest to target_params, searched over
    widths in steps of 16 with the full-resolution width fixed to ours."""
    best = None
    for rest in itertools.product(range(32, 161, 16), repeat=levels - 1):
        widths = (first_width,) + rest
        if list(widths) != sorted(widths):
            continue
        with torch.device("meta"):  # count parameters without allocating them
            n = count_params(diffusers_unet(widths, size, context_dim))
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (widths, n)
    if abs(best[1] - target_params) > 0.1 * target_params:
        print(f"warning: no diffusers UNet within 10% of {target_params} params; "
              f"closest has {best[1]}")
    return diffusers_unet(best[0], size, context_dim), best[0]


class Trainer:
    """One model, its AdamW optimizer, and a fixed batch; `step()` is one timed training step."""

    def __init__(self, name, model, call, batch, size, text_len, context_dim, device, amp):
        """amp: autocast dtype (torch.bfloat16 / torch.float16) or None for fp32."""
        self.name, self.model, self.call, self.device, self.amp = name, model, call, device, amp
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=g).to(device)
        self.target = torch.randn(batch, 3, size, size, generator=g).to(device)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        lengths = torch.randint(text_len // 2, text_len + 1, (batch,), generator=g)
        self.text = TextBatch(torch.randn(batch, text_len, context_dim, generator=g),
                              torch.arange(text_len)[None] < lengths[:, None]).to(device)
        self.times: list[float] = []

    def loss(self, model=None, n=None):
        """MSE of the model's output on the first n images of the batch (all by default)."""
        n = n or self.x.shape[0]
        with autocast(self.device, self.amp):
            out = self.call(model or self.model, self.x[:n], self.t[:n], self.text.index(slice(0, n)))
        return (out.float() - self.target[:n]).square().mean()

    def step(self, record: bool):
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - start)

    def train_flops_per_image(self, raw_model: nn.Module, n: int = 4) -> float:
        """Forward + backward FLOPs per image, counted on n images (FLOPs are linear in the
        batch) by the counter the training log uses."""
        n = min(n, self.x.shape[0])
        flops = train_flops_per_image(lambda: self.loss(raw_model, n), n)
        raw_model.zero_grad(set_to_none=True)
        return flops


def autocast(device: torch.device, amp):
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ours(model, x, t, text):
    return model(x, t, text)


def call_diffusers(model, x, t, text):
    return model(x, t, encoder_hidden_states=text.tokens,
                 encoder_attention_mask=text.mask.to(x.dtype), return_dict=False)[0]


def call_ours_default_kernel(model, x, t, text):
    """Our UNet with attention left to SDPA's default CPU kernel (flash), for the ablation:
    tti.models.backbones.unet.attention is swapped for plain SDPA while the forward pass records the graph
    (the backward replays what was recorded)."""
    explicit = tti.models.backbones.unet.attention
    tti.models.backbones.unet.attention = sdpa
    try:
        return model(x, t, text)
    finally:
        tti.models.backbones.unet.attention = explicit


def sdpa(q, k, v, attn_mask=None):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def alternate(runs, steps: int, warmup: int):
    """Interleave the runs' steps so slow phases of a shared machine hit all of them."""
    for i in range(warmup + steps):
        for run in runs:
            run(i >= warmup)


def shapes_captions(n: int, seed: int = 0) -> list[str]:
    """Distinct short captions like the embedded dataset's (about 14 MiniLM tokens)."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"]
    shapes = ["circle", "square", "triangle", "star"]
    relations = ["to the left of", "to the right of", "above", "below"]
    pool = [f"a {s1} {c1} {a} {r} a {s2} {c2} {b}" for s1, c1, a, r, s2, c2, b in
            itertools.product(["small", "large"], colours, shapes, relations, ["small", "large"],
                              colours, shapes) if c1 != c2]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def bench_unets(args, device, amp, ours, option_ablations=None):
    """option_ablations: {row name: (our UNet with one option of `ours` turned off, what the
    ratio line compares)}, e.g. the ablation of model.unet.narrow_upsample."""
    theirs_raw, widths = matched_diffusers_unet(count_params(ours), ours.channels[0],
                                               len(ours.channels), args.size, ours.context_dim)
    theirs_raw = theirs_raw.to(device)
    models = {"tti UNet": (ours, call_ours),
              f"diffusers UNet2DConditionModel{widths}": (theirs_raw, call_diffusers)}
    ablations = {}  # row name -> what its ratio line compares
    if device.type == "cpu" and amp is not None:  # the math-path choice: CPU, bf16/fp16 only
        name = "tti UNet, default SDPA kernel (ablation)"
        models[name] = (copy.deepcopy(ours), call_ours_default_kernel)
        ablations[name] = "the explicit attention path / default SDPA kernel"
    for name, (model, what) in (option_ablations or {}).items():
        models[name] = (model, call_ours)
        ablations[name] = what
    trainers = []
    for name, (raw, call) in models.items():
        model = torch.compile(raw) if args.compile else raw
        trainers.append(Trainer(name, model, call, args.batch, args.size, args.text_len,
                                ours.context_dim, device, amp))
    flops = {tr.name: tr.train_flops_per_image(raw)
             for tr, (raw, _) in zip(trainers, models.values())}
    print(f"\n== UNet training step: batch {args.batch}, {args.size}x{args.size}, "
          f"{args.text_len} text tokens of width {ours.context_dim}, "
          f"{precision_name(amp)}{', compiled' if args.compile else ''} ==")
    alternate([tr.step for tr in trainers], args.steps, args.warmup)
    rates = {}
    for tr, (raw, _) in zip(trainers, models.values()):
        med = statistics.median(tr.times)
        rates[tr.name] = args.batch / med
        achieved = flops[tr.name] * rates[tr.name] / 1e12
        line = (f"{tr.name:48s} params {count_params(raw) / 1e6:6.3f}M  "
                f"{rates[tr.name]:8.1f} img/s  (median {med * 1e3:7.1f} ms/step over "
                f"{len(tr.times)})  train GFLOP/img {flops[tr.name] / 1e9:6.3f}  "
                f"achieved {achieved:7.3f} TFLOP/s")
        peak = peak_tflops(device)
        if peak:
            line += f" = {100 * achieved / peak:.1f}% of {peak:.0f} bf16 peak"
        print(line)
    names = list(rates)
    print(f"ratio (tti / diffusers img/s, {precision_name(amp)}): "
          f"{rates[names[0]] / rates[names[1]]:.2f}x")
    for name, what in ablations.items():
        print(f"ratio (tti with {what}): {rates[names[0]] / rates[name]:.2f}x")
    return trainers[0].model


def bench_text_store(args, device, amp, unet, hidden_layer: int = -1):
    """The frozen encoder's share of a Diffusion.loss step, text from the store and live."""
    import os
    import tempfile

    from bench.text_store import encoder_share, print_share
    from tti.text.store import TextStore, build_store

    stored = TextEncoder(PACKAGED_MINILM, hidden_layer=hidden_layer).to(device)
    # The same (already truncated) model, asked for the same hidden state.
    live = TextEncoder(PACKAGED_MINILM, cache=False, tokenizer=stored.tokenizer,
                       model=stored.model, hidden_layer=stored.hidden_layer)
    pool = shapes_captions(4 * args.batch)
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, "store")
        build_store(stored, pool, folder)
        stored.use_store(TextStore(folder))
        diffusion = Diffusion(unet, GaussianDiffusion()).to(device)
        results = encoder_share(diffusion, {"text store": stored, "live encoder": live}, pool,
                                args.batch, args.size, device, amp, args.steps, args.warmup)
    tokens = stored.tokenizer(pool, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    print(f"\n== Diffusion.loss step with the frozen {PACKAGED_MINILM} encoder, hidden state "
          f"{stored.hidden_layer} of {stored.depth} "
          f"(captions of {tokens.float().mean():.1f} tokens on average) ==")
    print_share(results, args.batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    parser.add_argument("--size", type=int, default=32, help="image resolution")
    parser.add_argument("--text-len", type=int, default=14, help="text tokens per caption")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the CPUs free now, tti.infra.threads)")
    parser.add_argument("--skip-text", action="store_true", help="skip the text-store part")
    parser.add_argument("--precision", default="fp32,auto",
                        help="comma-separated: fp32, bf16, fp16, auto (what training uses); "
                             "the UNet comparison runs once per entry")
    parser.add_argument("--config", default="configs/shapes32.yaml",
                        help="our UNet is model.unet of this config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as in tti.train (repeatable)")
    args = parser.parse_args()
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        use_free_cpus()
    torch.manual_seed(0)
    device = torch.device(args.device)
    precisions = list(dict.fromkeys(amp_dtype(p.strip(), device)
                                    for p in args.precision.split(",")))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    start = time.perf_counter()
    cfg = load_config(args.config, args.set)
    u = cfg.model.unet
    ours = UNet(u, args.size, context_dim=384).to(device)  # MiniLM's token width
    option_ablations = {}  # narrow_upsample has a speed ablation: the UNet with it off
    if u.narrow_upsample:
        model = UNet(dataclasses.replace(u, narrow_upsample=False), args.size, context_dim=384)
        option_ablations["tti UNet, full-width upsampling (ablation)"] = (
            model.to(device), "narrow / full-width upsampling")
    print(f"ours: model.unet of {args.config}: {u}")
    for amp in precisions:
        trained_ours = bench_unets(args, device, amp, ours, option_ablations)
    if not args.skip_text:
        bench_text_store(args, device, precisions[-1], ours if not args.compile else trained_ours,
                         hidden_layer=cfg.text.hidden_layer)
    print(f"\ntotal bench time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
