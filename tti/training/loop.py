"""The training loop: one optimizer step over its micro-batches, bad-step accounting, the
log line, and `train_loop`, which runs the steps with checkpoints and in-loop checks."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from tti.config.schema import Config
from tti.infra import distributed
from tti.infra.checkpoints import latest_checkpoint
from tti.infra.cli import UserError
from tti.infra.gpus import is_out_of_memory
from tti.models.text_to_image import model_input
from tti.training.out_of_memory import out_of_memory
from tti.training.run_log import RunLog
from tti.training.state import TrainState, save_train_state
from tti.training.utilisation import utilisation


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced more NaN/inf losses than train.max_bad_steps allows."""


def train_step(state: TrainState, forward, micro_batches: list, cfg: Config,
               info: distributed.DistInfo) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over `micro_batches`, the step's list of (images, captions);
    state.step advances by one. forward: the model behind DDP and torch.compile when on.
    The update (AdamW, EMA) runs only if every rank's loss and gradients are finite.
    Returns (loss summed over the micro-batches, gradient norm before clipping, updated)."""
    tr, accum = cfg.train, len(micro_batches)
    # Caption dropout from its own stream keyed by (seed, step, rank): same after resume.
    drop = torch.Generator().manual_seed((tr.seed * 1_000_003 + state.step) * 4099 + info.rank)
    state.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=info.device)
    for i, (images, captions) in enumerate(micro_batches):
        images = model_input(images.to(info.device, non_blocking=True))
        keep = torch.rand(len(captions), generator=drop) >= cfg.text.caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        inner = info.enabled and i < accum - 1  # no all-reduce until the last
        with forward.no_sync() if inner else contextlib.nullcontext():
            with torch.autocast(info.device.type, dtype=state.amp or torch.float32,
                                enabled=state.amp is not None):
                loss = forward(images, captions) / accum
            state.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.trained_parameters(),
                                               tr.grad_clip or float("inf"))
    # NaN/inf gradients count as bad unless the fp16 scaler is on: it skips those steps itself.
    finite = torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) | state.scaler.is_enabled())
    state.step += 1
    updated = distributed.all_ranks_true(finite, info.device)
    scale = state.scaler.get_scale()
    if updated:
        state.scaler.step(state.optimizer)
    state.scaler.update()
    # The fp16 scaler skips the optimizer step on inf/nan gradients, and then lowers its scale.
    if updated and state.scaler.get_scale() >= scale:
        state.ema.update(state.model)
    state.scheduler.step()
    return loss_sum, grad_norm, updated


def count_bad_step(state: TrainState, cfg: Config, log: RunLog) -> None:
    """Log a skipped step; raise NonFiniteLossError past train.max_bad_steps."""
    state.bad_steps += 1
    limit = cfg.train.max_bad_steps
    log.print(f"step {state.step}: non-finite loss or gradient, step skipped "
              f"({state.bad_steps} bad so far, train.max_bad_steps={limit})")
    if state.bad_steps > limit:
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {state.step} ({state.bad_steps} bad steps, "
            f"train.max_bad_steps={limit}); stopping. The last good checkpoint is "
            f"{latest_checkpoint(cfg.run_dir()) or '(none yet)'}; lower train.lr, or raise "
            f"train.max_bad_steps to skip a few bad steps")


@dataclass
class Interval:
    """Where the run was at the last log line, and the data-loader wait since then (s);
    the run's training FLOPs per image (0 on ranks that do not log)."""
    start_step: int
    flops_per_image: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0


def log_interval(interval: Interval, state: TrainState, loss_sum: torch.Tensor,
                 grad_norm: torch.Tensor, cfg: Config, info: distributed.DistInfo, log: RunLog,
                 progress) -> Interval:
    """One log line (loss averaged over ranks, throughput, FLOP/s, data wait, peak memory);
    the next interval."""
    elapsed = max(time.perf_counter() - interval.start, 1e-9)
    images_per_s = (state.step - interval.start_step) * cfg.train.batch_size / elapsed
    loss = distributed.mean_over_ranks(loss_sum)
    log.scalars(state.step, {"loss": loss, "grad_norm": float(grad_norm),
                             "lr": state.scheduler.get_last_lr()[0], "img_per_s": images_per_s,
                             "data_wait": interval.data_wait / elapsed,
                             **utilisation(images_per_s, interval.flops_per_image,
                                           info.world_size, info.device)})
    progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")
    return Interval(state.step, interval.flops_per_image)


def sample_due(step: int, cfg: Config) -> bool:
    """Whether the in-loop grid (and judge) runs after `step`: every train.sample_every steps;
    at the last step only if train.sample_at_end (else the caller samples next) and the run
    is at least one interval long (a smoke run's grid shows nothing and can cost minutes)."""
    tr = cfg.train
    if step == tr.steps:
        return tr.sample_at_end and tr.steps >= tr.sample_every
    return step % tr.sample_every == 0


def train_loop(state: TrainState, forward, batches, cfg: Config, info: distributed.DistInfo,
               log: RunLog, sample_monitor=None, fid_monitor=None, flops: float = 0.0) -> None:
    """Optimizer steps until train.steps, each over the next item of `batches` (a step's
    micro-batches), with the log line, checkpoints and in-loop checks on their cadence.
    sample_monitor: rank 0's grids and judge (else None); fid_monitor: None when off."""
    tr = cfg.train
    state.model.train()
    progress = log.progress(state.step, tr.steps)
    interval = Interval(state.step, flops)
    try:
        while state.step < tr.steps:
            t_fetch = time.perf_counter()
            micro_batches = next(batches)
            interval.data_wait += time.perf_counter() - t_fetch
            try:
                loss_sum, grad_norm, updated = train_step(state, forward, micro_batches, cfg, info)
            except RuntimeError as error:  # torch.OutOfMemoryError is one
                if not is_out_of_memory(error):
                    raise
                # mid-step: the last checkpoint is untouched
                raise out_of_memory(cfg, info, state.step + 1, micro_batches, log) from None
            if not updated:
                count_bad_step(state, cfg, log)
            progress.update(1)
            last = state.step == tr.steps
            if state.step % tr.log_every == 0 or last:
                interval = log_interval(interval, state, loss_sum, grad_norm, cfg, info, log,
                                        progress)
            if state.step % tr.ckpt_every == 0 or last:
                save_train_state(state, cfg, info, log)
            if sample_monitor is not None and sample_due(state.step, cfg):
                sample_monitor.run(state.model, state.ema, state.step, log)
            if fid_monitor is not None and fid_monitor.due(state.step, last):
                fid_monitor.run(state, log)
    except Exception as error:  # a collective that failed because another rank stopped
        note = None if isinstance(error, UserError) else distributed.peer_stopped()
        if note is not None:
            raise distributed.PeerStoppedError(f"another rank stopped the run: {note}") from None
        raise
    finally:
        progress.close()
