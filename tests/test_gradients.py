"""DDP (find_unused_parameters=False) needs every trainable parameter to get a gradient at
every step, or it dies at step 2. Checked on the model `tti.models.text_to_image.build` makes, through the
real loss, for every shipped config (sizes shrunk, the tiny RoBERTa where a config names
roberta-base, the tiny VAE where it names an autoencoder), frozen and fine-tuned, for BERT,
RoBERTa and MiniLM encoders and alignDRAW; and by DDP itself, two steps with a fine-tuned encoder."""
import glob
import os

import pytest
import torch
import torch.nn as nn
from coco_fixture import write_coco_fixture

from tti.config.load import load_config
from tti.models.text_to_image import build, to_model_range
from tti.text.source import PACKAGED_MINILM, packaged_minilm_path
from tti.text.tiny_roberta import build_tiny_roberta
from tti.text.unused_parameters import drop_unused

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")))
# (config, finetune): alignDRAW's word vocabulary has no pretrained encoder to fine-tune.
CASES = [(config, finetune) for config in CONFIGS for finetune in (False, True)
         if not (finetune and load_config(os.path.join(REPO, "configs", config)).model.kind == "aligndraw")]
CAPTIONS = ["a red circle to the left of a blue square", "",
            "a green triangle " * 40, "Un carré bleu à gauche d’un cercle ☕"]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """text.name of each encoder kind: packaged MiniLM, tiny RoBERTa, tiny BERT (2 layers)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    captions = write_coco_fixture(tmp_path_factory.mktemp("coco")).all_captions()
    roberta = build_tiny_roberta(tmp_path_factory.mktemp("roberta") / "m", captions)
    bert = str(tmp_path_factory.mktemp("bert"))
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())  # BERT's WordPiece
    tokenizer.save_pretrained(bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    return {"minilm": PACKAGED_MINILM, "roberta": roberta, "bert": bert}


def small_config(config: str, text_name: str, *extra):
    """`config` with its network shrunk to seconds on a CPU; all else as shipped."""
    cfg = load_config(os.path.join(REPO, "configs", config))
    overrides = [f"text.name={text_name}", *extra]
    if cfg.model.kind == "diffusion" and cfg.model.backbone == "unet":
        levels = len(cfg.model.unet.channels)
        overrides += [f"model.unet.channels={[16] + [32] * (levels - 1)}", "model.unet.head_dim=16",
                      "model.unet.num_res_blocks=1", "model.unet.text_width=32"]
    if cfg.model.kind == "diffusion" and cfg.model.backbone == "transformer":
        overrides += ["model.transformer.width=32", "model.transformer.head_dim=16",
                      "model.transformer.depth=3", "model.transformer.text_width=32"]
    if cfg.model.kind == "aligndraw":
        overrides = [f"model.aligndraw.overrides.{key}={value}" for key, value in dict(
            draw_steps=2, word_dim=8, lang_dim=8, align_dim=8, latent_dim=4, enc_dim=16,
            dec_dim=16).items()]
    return load_config(os.path.join(REPO, "configs", config), overrides)


def assert_every_trainable_parameter_gets_a_gradient(cfg):
    model = build(cfg, train_captions=CAPTIONS)
    model.train()
    size = cfg.data.image_size
    images = to_model_range(torch.randint(0, 256, (len(CAPTIONS), 3, size, size), dtype=torch.uint8))
    model(images, CAPTIONS).backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = [name for name, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:8]}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    return model, trainable


@pytest.mark.parametrize("config, finetune", CASES)
def test_every_shipped_config(encoders, tiny_vae, config, finetune):
    cfg = load_config(os.path.join(REPO, "configs", config))
    name = encoders["roberta"] if cfg.text.name == "roberta-base" else cfg.text.name
    vae = [f"model.autoencoder={tiny_vae}"] if cfg.model.autoencoder else []
    cfg = small_config(config, name, f"text.finetune={finetune}", *vae)
    model, trainable = assert_every_trainable_parameter_gets_a_gradient(cfg)
    text_trained = [n for n in trainable if n.startswith("text.")]
    assert bool(text_trained) == (finetune and cfg.model.kind == "diffusion")


@pytest.mark.parametrize("kind, finetune, layer", [
    ("bert", False, -1), ("bert", True, -1), ("bert", True, 1),
    ("roberta", True, 1), ("minilm", True, -1)])
def test_every_encoder_kind_and_layer(encoders, kind, finetune, layer):
    cfg = small_config("coco32_ft_roberta.yaml", encoders[kind], f"text.finetune={finetune}",
                       f"text.hidden_layer={layer}")
    model, _ = assert_every_trainable_parameter_gets_a_gradient(cfg)
    assert model.text.dropped == ["pooler"]
    assert not any(".pooler." in name for name, _ in model.named_parameters())


def test_ddp_trains_a_fine_tuned_encoder_past_step_two(encoders, tmp_path):
    # One gloo process is enough: DDP's reducer checks unused parameters as with many.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cfg = small_config("coco32_ft_roberta.yaml", encoders["roberta"])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = DistributedDataParallel(build(cfg))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        images = to_model_range(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
        for _ in range(3):
            optimizer.zero_grad()
            model(images, CAPTIONS).backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()


class ToyWithUnusedParts(nn.Module):
    """A model that computes parts its output does not use, as a pooler is computed."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.pool = nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(3, 1)
        self.extra = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        self.head(x)  # computed and thrown away; the forward cannot run without it
        if self.pool is not None:  # optional, as Hugging Face models treat their pooler
            self.pool(x)
        return self.body(x)


def test_drop_unused_removes_what_it_can_and_freezes_the_rest():
    toy, x = ToyWithUnusedParts(), torch.randn(2, 3)
    expected = toy(x)
    dropped, frozen = drop_unused(toy, lambda: toy(x))
    assert dropped == ["pool"] and toy.pool is None
    assert sorted(frozen) == ["extra", "head.bias", "head.weight"] and toy.head is not None
    assert [name for name, p in toy.named_parameters() if p.requires_grad] == ["body.weight", "body.bias"]
    output = toy(x)
    torch.testing.assert_close(output, expected)
    output.sum().backward()
    assert all(p.grad is not None for p in toy.parameters() if p.requires_grad)
