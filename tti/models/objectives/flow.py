"""Rectified flow: x_t = (1 - t) x0 + t eps for t in [0, 1], a backbone that predicts the
velocity v = eps - x0, and ODE samplers from t = 1 (noise) to t = 0 (data).

Training draws t uniformly or from a logit-normal (the best timestep sampler in Esser et al.
2024); `shift` > 1 moves every t towards noise (their resolution shift), in training and
sampling alike. The backbone sees 1000 t, the scale its time embedding expects. Samplers
(samplers.py): Euler, Heun and DPM-Solver++(2M), on evenly spaced (then shifted) times.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tti.config.registry import Entry
from tti.config.rules import bounds, one_of
from tti.models.objectives.base import Objective
from tti.models.objectives.samplers import flow_dpmpp2m_step, heun_step
from tti.text.batch import TextBatch

TIME_SAMPLING = ("uniform", "logit_normal")
SAMPLERS = {"euler": "Euler", "heun": "Heun", "dpmpp2m": "DPM++(2M)"}  # first = default
TIME_SCALE = 1000.0  # t in [0, 1] reaches the backbone as 1000 t


@dataclass
class FlowConfig:
    time_sampling: str = "logit_normal"  # uniform | logit_normal (training's t)
    logit_mean: float = 0.0              # logit_normal: t = sigmoid(mean + scale * N(0, 1))
    logit_scale: float = 1.0
    shift: float = 1.0                   # > 1: every t moved towards noise (training and sampling)


def validate(cfg) -> None:
    f = cfg.model.flow
    one_of(f.time_sampling, TIME_SAMPLING, "model.flow.time_sampling")
    bounds(f, "model.flow", {"logit_scale": "> 0", "shift": "> 0"})


def build(cfg) -> "RectifiedFlow":
    f = cfg.model.flow
    return RectifiedFlow(f.time_sampling, f.logit_mean, f.logit_scale, f.shift)


def label(cfg) -> str:
    f = cfg.model.flow
    how = (f"logit-normal({f.logit_mean:g}, {f.logit_scale:g})" if f.time_sampling == "logit_normal"
           else "uniform")
    return f"rectified flow, {how} t" + (f", shift {f.shift:g}" if f.shift != 1 else "")


ENTRY = Entry("flow", build, FlowConfig, validate, SAMPLERS, label=label)


def shifted(t: torch.Tensor | float, shift: float):
    """t' = s t / (1 + (s - 1) t): 0 and 1 stay, everything between moves towards 1 (noise)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


class RectifiedFlow(Objective):
    """The straight path from data (t = 0) to noise (t = 1) and its velocity."""
    samplers = SAMPLERS

    def __init__(self, time_sampling: str = "logit_normal", logit_mean: float = 0.0,
                 logit_scale: float = 1.0, shift: float = 1.0):
        super().__init__()
        if time_sampling not in TIME_SAMPLING:
            raise ValueError(f"RectifiedFlow: unknown time_sampling {time_sampling!r}; choose one "
                             f"of {TIME_SAMPLING}")
        if not (logit_scale > 0 and shift > 0):
            raise ValueError(f"RectifiedFlow: logit_scale and shift must be > 0, got "
                             f"{logit_scale} and {shift}")
        self.time_sampling, self.shift = time_sampling, shift
        self.logit_mean, self.logit_scale = logit_mean, logit_scale

    def draw_times(self, n: int, device) -> torch.Tensor:
        """float [n] training times in (0, 1)."""
        if self.time_sampling == "uniform":
            t = torch.rand(n, device=device)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_scale * torch.randn(n, device=device))
        return shifted(t, self.shift)

    def loss(self, backbone, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """MSE between the backbone's velocity and eps - x0 at x_t = (1 - t) x0 + t eps."""
        t = self.draw_times(images.shape[0], images.device)
        noise = torch.randn_like(images)
        tb = t[:, None, None, None]
        velocity = backbone((1 - tb) * images + tb * noise, TIME_SCALE * t, text).float()
        return F.mse_loss(velocity, (noise - images).float())

    def check_sampling(self, sampler: str, steps: int, eta: float) -> None:
        super().check_sampling(sampler, steps, eta)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if eta > 0 and sampler != "dpmpp2m":
            raise ValueError(f"eta > 0 (a stochastic sampler) is DPM++(2M)'s option, not {sampler}'s")

    def sample(self, denoise, x, sampler, steps, eta, noise, return_trajectory):
        """From x at t = 1 to t = 0 over `steps` steps on times 1 - i / steps, shifted."""
        times = [float(shifted(1 - i / steps, self.shift)) for i in range(steps + 1)]
        b, trajectory, previous = x.shape[0], [], None
        velocity = lambda x, t: denoise(x, torch.full((b,), TIME_SCALE * t, device=x.device))
        for t_s, t_t in zip(times[:-1], times[1:]):
            v = velocity(x, t_s)
            x0 = x - t_s * v  # the data prediction at t_s
            if return_trajectory:
                trajectory.append(x0.clamp(-1, 1).cpu())
            if sampler == "euler":
                x = x + (t_t - t_s) * v
            elif sampler == "heun":
                x = heun_step(x, v, t_s, t_t, velocity)
            else:
                x, previous = flow_dpmpp2m_step(x, x0, t_s, t_t, previous, eta, noise)
        return x.clamp(-1, 1), trajectory
