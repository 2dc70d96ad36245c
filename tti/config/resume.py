"""Which settings a resumed run may change, and the record a resume with changes leaves.

The new config is compared key by key with the `config` in checkpoints/latest.pt. A FIXED key
(network, objective, training data, text encoder, seed, global batch) that differs is refused
in one message listing old -> new; APPLIED keys take effect from the resumed step on, printed
in the log and recorded in <run_dir>/history.jsonl. `POLICY` decides every key, with its
reason (tests/test_resume.py fails on one left undecided; docs/robustness.md explains them).
How applied keys reach the optimizer, schedule, EMA and scaler: tti/training/state.py.
"""
from __future__ import annotations

from tti.config.errors import ConfigError
from tti.config.load import flatten, from_dict
from tti.config.schema import Config

FIXED, APPLIED = "fixed", "applied"

_DATA = "the training data the weights were fitted to"
_TEXT = "the text features the network was trained to read"
_SCHEDULE = ("the LR schedule: recomputed from the config at the resumed step, as if the run "
             "had been launched with it")

POLICY = {
    "run": (APPLIED, "where the run lives: a copied or moved run directory resumes"),
    "data.root": (APPLIED, "where the data lives; its content is compared by fingerprint"),
    "data.cache_dir": (APPLIED, "where the packed cache lives"),
    "data.train_split": (FIXED, _DATA),
    "data.val_split": (APPLIED, "read by in-loop checks only"),
    "data.image_size": (FIXED, "the size of the images the network models"),
    "data.num_workers": (APPLIED, "loader speed only"),
    "data.max_bad_fraction": (APPLIED, "a threshold for building a cache, not its content"),
    "data.generate_shapes": (APPLIED, "whether missing shapes data is built; its counts are fixed"),
    "data.shapes_train": (FIXED, _DATA),
    "data.shapes_val": (FIXED, "the generator writes both splits of the shapes data together"),
    "data.canonical_caption_fraction": (FIXED, _DATA),
    "text.name": (FIXED, _TEXT),
    "text.finetune": (FIXED, _TEXT),
    "text.max_length": (FIXED, _TEXT),
    "text.hidden_layer": (FIXED, _TEXT),
    "text.lr": (APPLIED, "the fine-tuned encoder's optimizer group"),
    "text.cache": (APPLIED, "speed only"),
    "text.caption_dropout": (APPLIED, "read at every step"),
    "model": (FIXED, "the network's shape and the objective it learns"),
    "train.batch_size": (FIXED, "the global batch: every step's place in the data follows from it"),
    "train.seed": (FIXED, "the data order and the per-step random streams follow from it"),
    "train.grad_accum": (APPLIED, "how the same global batch splits into micro-batches"),
    "train.micro_batch": (APPLIED, "how the same global batch splits into micro-batches: "
                                   "another GPU, or the fix after an out-of-memory stop"),
    "train.steps": (APPLIED, _SCHEDULE),
    "train.lr": (APPLIED, _SCHEDULE),
    "train.warmup_steps": (APPLIED, _SCHEDULE),
    "train.lr_decay": (APPLIED, _SCHEDULE),
    "train.weight_decay": (APPLIED, "set on the optimizer's groups on resume"),
    "train.grad_clip": (APPLIED, "read at every step"),
    "train.ema_decay": (APPLIED, "the EMA's decay from the resumed step on"),
    "train.precision": (APPLIED, "the autocast dtype; a new fp16 loss scaler starts fresh"),
    "train.deterministic": (APPLIED, "how kernels run"),
    "train.compile": (APPLIED, "how kernels run"),
    "train.log_every": (APPLIED, "logging"),
    "train.sample_every": (APPLIED, "in-loop checks"),
    "train.sample_at_end": (APPLIED, "in-loop checks"),
    "train.eval_samples": (APPLIED, "in-loop checks"),
    "train.fid_every": (APPLIED, "in-loop checks"),
    "train.fid_samples": (FIXED, "checkpoints/best.pt compares FIDs over one fixed val subset"),
    "train.ckpt_every": (APPLIED, "checkpoint cadence"),
    "train.keep_last": (APPLIED, "checkpoint cadence"),
    "train.max_bad_steps": (APPLIED, "a stopping rule, read at every bad step"),
    "sample": (APPLIED, "in-loop sample grids only"),
}


def policy(key: str) -> tuple[str, str]:
    """(FIXED or APPLIED, why) for a dotted config key: its own POLICY entry, else its
    closest section's. KeyError for a key no entry covers."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        entry = POLICY.get(".".join(parts[:n]))
        if entry is not None:
            return entry
    raise KeyError(f"{key}: no resume policy; add it to tti.config.resume.POLICY")


def config_changes(old: Config, new: Config) -> dict:
    """{dotted key: (old value, new value)} for every setting that differs, in config order."""
    before, after = flatten(old.to_dict()), flatten(new.to_dict())
    return {k: (before.get(k), after.get(k)) for k in {**before, **after}
            if before.get(k) != after.get(k)}


def describe(changes: dict) -> str:
    """'train.lr 0.001 -> 0.0005, train.steps 6 -> 8' (one line)."""
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def resume_changes(saved: dict, cfg: Config, step: int, checkpoint: str) -> dict:
    """{key: (old, new)} of the APPLIED settings a resume from `checkpoint` (at `step`, trained
    under the config dict `saved`) changes. ConfigError naming every FIXED key that differs,
    or for a train.steps the run has already passed."""
    try:
        old = from_dict(saved)
    except ConfigError as e:
        raise ConfigError(f"{checkpoint}: its config no longer loads ({e}); resume it with the "
                          f"tti version that wrote it, or start a new run.run_idx") from None
    changes = config_changes(old, cfg)
    refused = {k: v for k, v in changes.items() if policy(k)[0] == FIXED}
    if refused:
        raise ConfigError(
            f"{cfg.run_dir()} resumes from {checkpoint} (step {step}), but settings that cannot "
            f"change mid-run differ from it: {describe(refused)}. Revert them (the --set item or "
            f"the YAML file) to resume this run, or set another run.run_idx to start a new one",
            tuple(refused))
    if cfg.train.steps < step:
        raise ConfigError(f"train.steps: {cfg.train.steps} is below step {step}, where "
                          f"{cfg.run_dir()} resumes; set it to {step} or more", ("train.steps",))
    return changes
