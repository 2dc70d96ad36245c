"""What a launch checks before it starts processes, packs data or makes a run directory: the
config is valid for the processes that share its batch, the text encoder's weights can be
found, and the checkpoint it would resume from (or sample) asks to run no code. `tti.train`
runs `check_training` before it joins the process group; the bash launchers run this module
once before torchrun, so a mistake prints one line instead of one per rank inside torchrun's
failure report:

    python -m tti.preflight --world-size 4 --config configs/coco64_ft_roberta.yaml --set ...
    python -m tti.preflight --run-dir-only --config configs/coco64_ft_roberta.yaml \
        --set run.run_idx=0
    python -m tti.preflight --checkpoint results/coco64_ft_roberta_diffusion/0

The first two print the run directory, results/<run.dataset>_<model.kind>/<run.run_idx>, on
success; the third prints the checkpoint file (or release folder) it checked.
"""
from __future__ import annotations

import argparse

import tti.models  # noqa: F401  (registers the plug-ins the config names)
from tti.config.load import load_config
from tti.config.rules import validate
from tti.config.schema import Config
from tti.infra.checkpoints import checkpoint_file, latest_checkpoint, refuse_unsafe
from tti.infra.cli import check_at_least, run_cli
from tti.infra.release_folder import is_release_folder
from tti.text.source import check_text_encoder


def check_training(cfg: Config, world_size: int) -> None:
    """ConfigError unless train.batch_size splits over `world_size` processes (and every
    other rule of validate holds); TextEncoderError unless text.name can be loaded here;
    UnsafeCheckpointError if the checkpoint the run would resume from asks to run code.
    Fast: reads no data and no weights."""
    validate(cfg, world_size=world_size)
    check_text_encoder(cfg.text.name)
    resume_from = latest_checkpoint(cfg.run_dir())
    if resume_from is not None:
        refuse_unsafe(resume_from)


def check_checkpoint(path: str) -> str:
    """The checkpoint file (or release folder) `path` names, after checking that it exists and
    asks to run no code (CheckpointError otherwise). Fast: reads the pickle, not the weights."""
    if is_release_folder(path):  # JSON and safetensors: nothing in it can run
        return path
    path = checkpoint_file(path)
    refuse_unsafe(path)
    return path


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m tti.preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file under configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as tti.train takes it (repeatable)")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes the run will have (nodes x processes per node)")
    p.add_argument("--run-dir-only", action="store_true",
                   help="only read the config and print its run directory (to find a run)")
    p.add_argument("--checkpoint", help="only check this checkpoint file, run directory or "
                                        "release folder (what a sampling launch loads)")
    args = p.parse_args(argv)
    check_at_least(p, args, {"world_size": 1})
    if args.checkpoint:
        path = check_checkpoint(args.checkpoint)
        print(path)
        return path
    if not args.config:
        p.error("--config is required (or --checkpoint PATH)")
    cfg = load_config(args.config, args.set)
    if not args.run_dir_only:
        check_training(cfg, args.world_size)
    print(cfg.run_dir())
    return cfg.run_dir()


if __name__ == "__main__":
    run_cli(main)
