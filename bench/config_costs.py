"""What each shipped config costs to train, counted on a CPU: parameters, the fp32 training
state they need, and FLOPs per training image (torch.utils.flop_counter).

    python -m bench.config_costs                         # every configs/*.yaml, a markdown table
    python -m bench.config_costs configs/coco64_ft_roberta.yaml

The FLOPs are one training step's forward + backward of the model the config builds
(`tti.models.text_to_image.build`: text encoder + UNet diffusion loss, or alignDRAW's bound), divided by
the batch, on a batch of the config's own grid captions (sample.captions) at its image size,
with attention through the math kernel so the counter sees every matmul. The text encoder
counts as it runs in training: forward + backward when fine-tuned, forward when frozen
without a cache, nothing when its cache holds the caption. Not counted: the AdamW and EMA
updates (a few FLOPs per parameter per step) and data loading.

No weights are downloaded: roberta-base is built from its configuration (12 layers, width
768, vocabulary 50,265) with random weights, the same FLOPs and parameters as the real
model, and its captions are tokenized by the packaged MiniLM's tokenizer (roberta-base's own
BPE cannot be fetched here; the token count is printed). A latent-space config's VAE is the
SD VAE's architecture with random weights (tti.models.tiny_vae.SD_VAE); it counts as frozen
parameters and costs no training FLOPs, as training reads its latents from the latent store.

--activations adds the bytes each training image keeps for the backward pass (every tensor
autograd saves, counted by torch.autograd.graph.saved_tensors_hooks; fp32, the math attention
kernel, so an upper bound for bf16 and flash attention): with the fp32 state, what a GPU
needs per micro-batch image. alignDRAW's word embeddings depend
on the training vocabulary and are left out of its parameter count (`word_dim` per word).
"""
from __future__ import annotations

import argparse
import glob
import os
import tempfile

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tti.config.load import load_config
from tti.config.schema import Config
from tti.config.registry import MODEL_KINDS
from tti.models.text_to_image import TextToImage, build_text_encoder
from tti.text.encoder import TextEncoder
from tti.text.source import packaged_minilm_path
from tti.text.store import TextStore, build_store

# roberta-base's config.json, as from_pretrained("roberta-base") reads it.
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072,
                    max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                    bos_token_id=0, pad_token_id=1, eos_token_id=2)
FALLBACK_CAPTIONS = "configs/shapes32.yaml"  # for a config with no grid captions of its own


def sd_shaped_autoencoder(cfg: Config):
    """The SD VAE's architecture with random weights for a latent-space config, else None."""
    if not cfg.model.autoencoder:
        return None
    from tti.models.autoencoder import FrozenAutoencoder
    from tti.models.tiny_vae import SD_VAE, make_vae

    return FrozenAutoencoder(cfg.model.autoencoder, make_vae(SD_VAE))


def model_for(cfg: Config, captions: list[str]) -> TextToImage:
    """The model `cfg` trains, with a random roberta-base (and SD-shaped VAE) where the
    config names them."""
    autoencoder = sd_shaped_autoencoder(cfg)
    if cfg.text.name != "roberta-base":
        text = build_text_encoder(cfg, train_captions=captions)
        return TextToImage(text, MODEL_KINDS.get(cfg.model.kind).build(cfg, text), autoencoder)
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    t = cfg.text
    text = TextEncoder(t.name, finetune=t.finetune, max_length=t.max_length, cache=t.cache,
                       hidden_layer=t.hidden_layer,
                       tokenizer=AutoTokenizer.from_pretrained(packaged_minilm_path()),
                       model=RobertaModel(RobertaConfig(**ROBERTA_BASE)))
    return TextToImage(text, MODEL_KINDS.get(cfg.model.kind).build(cfg, text), autoencoder)


def count(model: TextToImage, images: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    """(training FLOPs per image, of which the text encoder's) for one step on this batch.
    The two parts are counted apart: the counter's per-module split misses backward passes."""
    model.train()
    with FlopCounterMode(display=False) as text_counter, sdpa_kernel([SDPBackend.MATH]):
        text = model.text(captions)
        if text.tokens.requires_grad:  # fine-tuned: its backward runs too
            text.tokens.backward(torch.randn_like(text.tokens))
    text = type(text)(text.tokens.detach(), text.mask)
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        model.image_model.loss(images, text).backward()
    model.zero_grad(set_to_none=True)
    text_flops = text_counter.get_total_flops()
    return (counter.get_total_flops() + text_flops) / len(captions), text_flops / len(captions)


def costs(path: str, activations: bool = False) -> dict:
    """One row of the table for the config file at `path`."""
    cfg = load_config(path)
    captions = cfg.sample.captions or load_config(FALLBACK_CAPTIONS).sample.captions
    torch.manual_seed(0)
    model = model_for(cfg, captions)
    with tempfile.TemporaryDirectory() as tmp:
        if getattr(model.text, "use_cache", False):  # read from a store, as training does
            store = os.path.join(tmp, "store")
            build_store(model.text, captions, store)
            model.text.use_store(TextStore(store))
        return row(path, cfg, model, captions, activations)


def training_input(cfg, model: TextToImage, n: int) -> torch.Tensor:
    """What the image model learns from, for n images: pixels in [-1, 1], or latents drawn
    from a latent store's moments (random here: the encoder does not run in training)."""
    channels, size = cfg.grid()
    if model.autoencoder is None:
        return torch.rand(n, channels, size, size) * 2 - 1
    moments = torch.cat([torch.randn(n, channels, size, size) * 5,
                         torch.rand(n, channels, size, size) * 0.1], dim=1)
    return model.autoencoder.training_latents(moments)


def activation_bytes(model: TextToImage, images: torch.Tensor, captions: list[str]) -> float:
    """Bytes autograd saves for the backward pass of one training step, per image (fp32)."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            sdpa_kernel([SDPBackend.MATH]):
        loss = model.image_model.loss(images, model.text(captions))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved) / len(captions)


def row(path: str, cfg, model: TextToImage, captions: list[str], activations: bool = False) -> dict:
    """The table's row for `model`, built from the config at `path`."""
    images = training_input(cfg, model, len(captions))
    flops, text_flops = count(model, images, captions)
    act = activation_bytes(model, images, captions) if activations else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if cfg.model.kind == "aligndraw":
        trainable -= model.image_model.caption_encoder.embed.weight.numel()
    tokenizer = getattr(model.text, "tokenizer", None)
    tokens = (sum(len(ids) for ids in tokenizer(captions)["input_ids"]) / len(captions)
              if tokenizer is not None else None)
    # fp32 weights, gradients, AdamW's two moments and the EMA copy of every trained weight;
    # a frozen encoder's weights once. Activations come on top.
    state_bytes = 4 * (5 * trainable + frozen)
    return {"config": os.path.basename(path), "trainable": trainable, "frozen": frozen,
            "state_gb": state_bytes / 1e9, "gflops": flops / 1e9,
            "text_gflops": text_flops / 1e9, "tokens": tokens,
            "activation_mb": act / 1e6 if act is not None else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="config files (default: configs/*.yaml)")
    parser.add_argument("--activations", action="store_true",
                        help="add the activation memory per training image (see above)")
    args = parser.parse_args()
    paths = args.configs or sorted(glob.glob("configs/*.yaml"))
    extra = " activations MB/image (fp32) |" if args.activations else ""
    print("| config | trained params | frozen params | fp32 state (GB) | train GFLOP/image "
          "| of which text encoder | tokens/caption |" + extra)
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if extra else ""))
    for path in paths:
        r = costs(path, args.activations)
        tokens = f"{r['tokens']:.1f}" if r["tokens"] is not None else "words"
        act = f" {r['activation_mb']:.0f} |" if extra else ""
        print(f"| {r['config']} | {r['trainable'] / 1e6:.2f}M | {r['frozen'] / 1e6:.2f}M | "
              f"{r['state_gb']:.2f} | {r['gflops']:.3f} | {r['text_gflops']:.3f} | {tokens} |"
              + act, flush=True)


if __name__ == "__main__":
    main()
