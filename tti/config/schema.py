"""The run's config as typed dataclasses, with every default in one place.

`model` names a model kind and, for kinds that compose one, an objective and a backbone; each
of these plug-ins reads its own section `model.<name>`, typed by the dataclass it registered
(tti/config/registry.py). Read by tti/config/load.py, checked by tti/config/rules.py.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

from tti.config.registry import used_entries


# The Stable Diffusion VAE family (sd-vae-ft-ema / -mse): 8x smaller, 4 latent channels.
# tti/models/autoencoder.py refuses a VAE of another shape when it loads one.
LATENT_FACTOR = 8
LATENT_CHANNELS = 4


class Grid(NamedTuple):
    """What the image model learns: `channels` x `size` x `size` arrays."""
    channels: int
    size: int


@dataclass
class RunConfig:
    dataset: str = "shapes"          # names the run folder: results/<dataset>_<model>/<run_idx>
    run_idx: int = 0
    results_dir: str = "results"


@dataclass
class DataConfig:
    root: str = "data/shapes"        # a COCO 2014 layout: annotations/, train2014/, val2014/
    train_split: str = "train2014"
    val_split: str = "val2014"
    image_size: int = 32
    cache_dir: Optional[str] = None  # packed uint8 cache and text store; default <root>/cache
    num_workers: int = 2             # DataLoader workers (and prepare's worker processes)
    max_bad_fraction: float = 0.01   # prepare fails if more images than this are unreadable
    generate_shapes: bool = False    # build the embedded dataset into root if it is missing
    shapes_train: int = 20000
    shapes_val: int = 1000
    # Share of training captions replaced by their canonical phrasing (shapes only; the
    # left/top object named first, tti/data/canonical.py); 0 = the captions as written.
    canonical_caption_fraction: float = 0.0


@dataclass
class TextConfig:
    name: str = "packaged-minilm"    # HF id ("roberta-base"), a folder, "packaged-minilm", or "vocab"
    finetune: bool = False
    lr: float = 1e-5                 # encoder learning rate when fine-tuned
    max_length: int = 32
    hidden_layer: int = -1           # encoder hidden state the model reads: -1 = last, k = layer k
    cache: bool = True               # frozen encoder: states from the text store
    caption_dropout: float = 0.1     # share of captions replaced by "" (classifier-free guidance)


@dataclass
class ModelConfig:
    """The kind, its parts, and the sections of the plug-ins they name, kept in `sections` and
    read as attributes (cfg.model.unet). A section left out takes its dataclass's defaults; that
    of a plug-in the model does not use is type-checked when read, then dropped."""
    kind: str = "diffusion"          # tti/models/registry.py lists the kinds, objectives, backbones
    objective: str = "gaussian"      # diffusion: what it learns and how it samples
    backbone: str = "unet"           # diffusion: the network
    # A frozen VAE (an HF id such as stabilityai/sd-vae-ft-ema, or a folder): the model learns
    # its latents and sample() decodes them. "" = pixel space.
    autoencoder: str = ""
    sections: dict = field(default_factory=dict)

    def __post_init__(self):
        used = [e for e in used_entries(self) if e.schema is not None]
        self.sections = {e.name: self.sections.get(e.name) or e.schema() for e in used}

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"model has no section {name!r} (sections: {', '.join(sections)})")

    def to_dict(self) -> dict:
        """kind, the parts its kind composes, and the sections of the plug-ins in use."""
        entries = used_entries(self)
        out = {"kind": self.kind, **{part: getattr(self, part) for part in entries[0].parts}}
        if self.autoencoder:  # pixel-space configs and checkpoints read as they always did
            out["autoencoder"] = self.autoencoder
        for entry in entries:
            if entry.schema is not None:
                out[entry.name] = dataclasses.asdict(self.sections[entry.name])
        return out


@dataclass
class TrainConfig:
    batch_size: int = 64             # global batch (all ranks, one optimizer step)
    grad_accum: int = 1              # micro-batches per optimizer step (with micro_batch null)
    # Images per process per forward pass: auto (the largest that fits the GPU, measured at
    # start; on a CPU as null), a number (grad_accum follows from it), or null (batch_size /
    # processes / grad_accum). Any of them trains the same run (tti/training/batch_plan.py).
    micro_batch: Optional[Union[int, str]] = None
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_decay: str = "constant"       # constant | cosine (to 10% of lr after warm-up)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    precision: str = "auto"          # auto (bf16 on CUDA and bf16-capable CPUs, else fp32) | fp32 | bf16 | fp16
    seed: int = 0
    deterministic: bool = False      # torch deterministic algorithms (exact resume on CPU)
    log_every: int = 25
    sample_every: int = 500          # in-loop sample grid (and judge accuracy, see eval_samples)
    sample_at_end: bool = True       # the last step too (quickstart.sh: off, it samples and judges next)
    eval_samples: int = 0            # val captions judged in-loop (embedded shapes dataset only)
    fid_every: int = 0               # FID of the EMA weights on a fixed val subset every N steps; 0 = off
    fid_samples: int = 2000          # val images (one caption and seed each) that FID generates
    ckpt_every: int = 500
    keep_last: int = 3               # step-numbered checkpoints kept (plus latest)
    max_bad_steps: int = 0           # non-finite losses tolerated (skipped) before stopping
    compile: bool = False


@dataclass
class SampleConfig:
    sampler: str = "dpmpp2m"         # one of the objective's samplers (tti/models/objectives/)
    steps: int = 20
    eta: float = 0.0
    guidance: float = 2.0
    captions: list[str] = field(default_factory=list)   # fixed captions for in-loop grids


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def run_dir(self) -> str:
        return os.path.join(self.run.results_dir, f"{self.run.dataset}_{self.model.kind}",
                            str(self.run.run_idx))

    def grid(self) -> Grid:
        """RGB pixels at data.image_size, or with model.autoencoder its latents: 4 channels at
        data.image_size / 8 (a 256 px image is a 4 x 32 x 32 latent)."""
        if self.model.autoencoder:
            return Grid(LATENT_CHANNELS, self.data.image_size // LATENT_FACTOR)
        return Grid(3, self.data.image_size)

    def micro_batch(self, world_size: int) -> int:
        """Images per process per forward pass as the config states them: train.micro_batch
        when it is a number, else train.batch_size over processes and grad_accum (for auto
        that is the starting point: tti/training/batch_plan.py measures the real one)."""
        if isinstance(self.train.micro_batch, int):
            return self.train.micro_batch
        return self.train.batch_size // (world_size * self.train.grad_accum)

    def to_dict(self) -> dict:
        return {f.name: (self.model.to_dict() if f.name == "model"
                         else dataclasses.asdict(getattr(self, f.name)))
                for f in dataclasses.fields(self)}
