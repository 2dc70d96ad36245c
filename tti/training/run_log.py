"""What a training run writes for people and tools: log.txt, tensorboard, a progress bar and
history.jsonl, one JSON object a line per event (rank 0)."""
from __future__ import annotations

import json
import os
import sys
import time

from tti.config.resume import describe

HISTORY_FILE = "history.jsonl"


class RunLog:
    """log.txt + tensorboard + tqdm, all on rank 0 only (every call is a no-op elsewhere)."""

    def __init__(self, run_dir: str, is_main: bool):
        self.is_main = is_main
        self.history_path = os.path.join(run_dir, HISTORY_FILE)
        self.file = self.writer = None
        if is_main:
            os.makedirs(run_dir, exist_ok=True)
            self.file = open(os.path.join(run_dir, "log.txt"), "a")
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def print(self, message: str) -> None:
        if self.is_main:
            from tqdm import tqdm
            tqdm.write(message)
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.file.flush()

    def scalars(self, step: int, values: dict) -> None:
        """One `step N key=value ...` line in log.txt and one tensorboard point per value."""
        if self.is_main:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.file.write(f"step {step} " + " ".join(f"{k}={v:.5g}" for k, v in values.items()) + "\n")
            self.file.flush()

    def record(self, entry: dict) -> None:
        """Append `entry` with the time as one JSON line to the run's history.jsonl."""
        if self.is_main:
            with open(self.history_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}) + "\n")

    def progress(self, start: int, total: int):
        from tqdm import tqdm
        return tqdm(total=total, initial=start, disable=not self.is_main, desc="train",
                    unit="step", dynamic_ncols=True, file=sys.stderr)

    def close(self) -> None:
        if self.is_main and self.file is not None:
            self.writer.close()
            self.file.close()
            self.file = None


def describe_data(dataset) -> str:
    """One paragraph on a packed split: images kept, what prepare skipped and why, with the
    first few unreadable files by name (from the cache's index)."""
    with open(dataset.index_path, encoding="utf-8") as f:
        index = json.load(f)
    skipped = {k: v for k, v in index.get("skipped", {}).items() if v}
    text = f"data {index['split']}: {len(dataset)} images at {index['image_size']}px"
    if not skipped:
        return text + ", nothing skipped"
    text += ", skipped " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items())
    return text + "".join(f"\n  unreadable: {line}" for line in index.get("unreadable_examples", []))


def record_launch(log: RunLog, step: int, changes: dict, checkpoint: str | None,
                  world_size: int, batch: dict | None = None) -> None:
    """Once a launch's settings are settled: the log shows what it changed, and history.jsonl
    gets one line: time, step, the checkpoint resumed from (null when fresh), world size, the
    applied changes {key: [old, new]} and `batch`, how this launch splits the global batch."""
    if changes:
        log.print(f"resumed with changed settings: {describe(changes)}")
    log.record({"step": step, "resumed_from": checkpoint, "world_size": world_size,
                "changes": {k: list(v) for k, v in changes.items()}, **(batch or {})})
