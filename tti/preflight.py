"""What a training launch checks before it starts processes, packs data or makes a run
directory: the config is valid for the processes that share its batch, and the text
encoder's weights can be found. `tti.train` runs `check_training` before it joins the process
group; the bash launchers run this module once before torchrun, so a mistake prints one line
instead of one per rank inside torchrun's failure report:

    python -m tti.preflight --world-size 4 --config configs/coco64_ft_roberta.yaml --set ...
    python -m tti.preflight --run-dir-only --config configs/coco64_ft_roberta.yaml \
        --set run.run_idx=0

Both print the run directory, results/<run.dataset>_<model.kind>/<run.run_idx>, on success.
"""
from __future__ import annotations

import argparse

import tti.models  # noqa: F401  (registers the plug-ins the config names)
from tti.config.load import load_config
from tti.config.rules import validate
from tti.config.schema import Config
from tti.infra.cli import check_at_least, run_cli
from tti.models.autoencoder import check_autoencoder
from tti.text.source import check_text_encoder


def check_training(cfg: Config, world_size: int) -> None:
    """ConfigError unless train.batch_size splits over `world_size` processes (and every
    other rule of validate holds); TextEncoderError unless text.name can be loaded here.
    AutoencoderError unless model.autoencoder (if set) can be. Fast: reads no data and no
    weights."""
    validate(cfg, world_size=world_size)
    check_text_encoder(cfg.text.name)
    if cfg.model.autoencoder:
        check_autoencoder(cfg.model.autoencoder)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m tti.preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file under configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as tti.train takes it (repeatable)")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes the run will have (nodes x processes per node)")
    p.add_argument("--run-dir-only", action="store_true",
                   help="only read the config and print its run directory (to find a run)")
    args = p.parse_args(argv)
    check_at_least(p, args, {"world_size": 1})
    cfg = load_config(args.config, args.set)
    if not args.run_dir_only:
        check_training(cfg, args.world_size)
    print(cfg.run_dir())
    return cfg.run_dir()


if __name__ == "__main__":
    run_cli(main)
