"""A tiny trained diffusion run shared by the export and evaluate tests (seconds on a CPU)."""
import os

from tti import train
from tti.data.shapes import write_coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "data.shapes_train=96", "data.shapes_val=16", "data.num_workers=0",
    "model.unet.channels=[16, 32]", "model.unet.attn_resolutions=[16]", "model.unet.self_attn_resolutions=[16]", "model.unet.head_dim=16",
    "sample.steps=4", "sample.guidance=2.0",
    "train.batch_size=16", "train.warmup_steps=2", "train.log_every=1", "train.steps=2",
    "train.ckpt_every=2", "train.sample_every=1000", "train.eval_samples=0",
]


def train_tiny_run(tmp_path_factory, extra: tuple = ()) -> str:
    """Write a 96/16-image shapes set, train 2 steps of a 16/32-channel UNet (configs/shapes32.yaml's
    objective, or `extra` --set items after TINY's); the run dir."""
    root = tmp_path_factory.mktemp("shapes")
    write_coco(str(root), n_train=96, n_val=16, image_size=32, seed=0)
    args = ["--config", os.path.join(REPO, "configs", "shapes32.yaml"), "--device", "cpu",
            "--set", f"data.root={root}",
            "--set", f"run.results_dir={tmp_path_factory.mktemp('results')}"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return train.main(args)
