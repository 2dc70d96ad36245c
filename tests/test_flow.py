"""Rectified flow: its samplers against the exact velocity of Gaussian data, point masses, a
2-D mixture learnt in a few hundred steps, the loss's target, and the time draws."""
import math

import pytest
import torch
import torch.nn as nn

from tti.models.diffusion import Diffusion
from tti.models.objectives.flow import TIME_SCALE, RectifiedFlow, shifted
from tti.models.objectives.samplers import flow_dpmpp2m_step
from tti.text.batch import TextBatch

MU, S = 0.2, 0.3  # data N(MU, S^2) per pixel; every sample lands well inside [-1, 1]


def exact_velocity(mu: float, s: float):
    """E[eps - x0 | x_t] for x0 ~ N(mu, s^2): -mu + (t - (1 - t) s^2) / V (x - (1 - t) mu),
    V = (1 - t)^2 s^2 + t^2. Called as the samplers call the backbone: t in [0, 1000]."""
    def denoise(x, t):
        t = (t / TIME_SCALE).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        return -mu + (t - (1 - t) * s ** 2) / var * (x - (1 - t) * mu)
    return denoise


def sample(sampler, steps, x, shift=1.0, denoise=None):
    flow = RectifiedFlow(shift=shift)
    images, _ = flow.sample(denoise or exact_velocity(MU, S), x, sampler, steps, 0.0,
                            lambda: pytest.fail("deterministic samplers draw no noise"), False)
    return images


def observed_orders(errors):
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


Z = torch.linspace(-2.0, 2.0, 64, dtype=torch.float64).view(2, 2, 4, 4)


def ode_solution(t: float) -> torch.Tensor:
    """Where the probability-flow ODE of N(MU, S^2) takes noise Z by time t (MU + S Z at 0)."""
    return (1 - t) * MU + math.sqrt((1 - t) ** 2 * S ** 2 + t ** 2) * Z


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2)])
def test_euler_and_heun_errors_fall_at_their_order(sampler, order, shift):
    """Through RectifiedFlow.sample on its (shifted) grid: each doubling of the steps divides
    the error by 2 (Euler) or 4 (Heun)."""
    errors = [(sample(sampler, n, Z, shift) - ode_solution(0)).abs().max().item()
              for n in (16, 32, 64, 128)]
    orders = observed_orders(errors)
    assert all(order - 0.2 < p < order + 0.25 for p in orders), (errors, orders)


def test_dpmpp2m_is_second_order_on_an_even_lambda_grid():
    """The flow form of DPM-Solver++(2M) with the exact data prediction, on a grid even in
    lambda = log((1 - t) / t) from -6 to 6 (its convergence theory's steps), against the
    exact ODE: 4x less error per doubling."""
    velocity = exact_velocity(MU, S)
    t_of = lambda lam: 1 / (1 + math.exp(lam))
    errors = []
    for n in (32, 64, 128, 256):
        times = [t_of(-6 + 12 * i / n) for i in range(n + 1)]
        x, previous = ode_solution(times[0]), None
        for t_s, t_t in zip(times[:-1], times[1:]):
            x0 = x - t_s * velocity(x, torch.full((1,), TIME_SCALE * t_s, dtype=torch.float64))
            x, previous = flow_dpmpp2m_step(x, x0, t_s, t_t, previous, 0.0, None)
        errors.append((x - ode_solution(times[-1])).abs().max().item())
    assert all(1.85 < p < 2.2 for p in observed_orders(errors)), errors


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dpmpp2m_through_sample_is_far_closer_than_euler(shift):
    """On the evenly spaced times users sample with, whose last steps are long in lambda,
    DPM-Solver++(2M) is still well under a quarter of Euler's error at equal evaluations."""
    for n in (32, 64, 128):
        euler = (sample("euler", n, Z, shift) - ode_solution(0)).abs().max().item()
        dpm = (sample("dpmpp2m", n, Z, shift) - ode_solution(0)).abs().max().item()
        assert dpm < euler / 4, (n, dpm, euler)


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp2m"])
def test_point_mass_data_come_out_exactly(sampler):
    """With all data at one point the paths are straight lines: any sampler, any steps."""
    z = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    for steps in (1, 2, 7):
        out = sample(sampler, steps, z, denoise=exact_velocity(0.4, 0.0))
        torch.testing.assert_close(out, torch.full_like(z, 0.4), atol=1e-7, rtol=0)


def test_the_loss_is_zero_for_the_true_velocity():
    """Point-mass data c: x_t = (1 - t) c + t eps, so v = eps - c = (x_t - c) / t."""
    c = torch.full((4, 3, 8, 8), 0.3)
    backbone = lambda x, t, text: (x - c) / (t / TIME_SCALE).view(-1, 1, 1, 1)
    text = TextBatch(torch.zeros(4, 1, 2), torch.ones(4, 1, dtype=torch.bool))
    flow = RectifiedFlow()
    assert flow.loss(backbone, c, text).item() < 1e-8
    assert flow.loss(lambda x, t, text: torch.zeros_like(x), c, text).item() > 0.5


def test_time_draws_follow_their_distribution():
    torch.manual_seed(0)
    t = RectifiedFlow("logit_normal", logit_mean=0.5, logit_scale=0.8).draw_times(40000, "cpu")
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    u = RectifiedFlow("uniform").draw_times(40000, "cpu")
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    assert shifted(0.0, 3.0) == 0.0 and shifted(1.0, 3.0) == 1.0 and shifted(0.5, 3.0) == 0.75


class Mlp(nn.Module):
    """A velocity network for 2-D points stored as [B, 2, 1, 1] images."""
    image_size, image_channels = 1, 2

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 2))

    def forward(self, x, t, text):
        h = torch.cat([x.flatten(1), (t / TIME_SCALE)[:, None]], dim=1)
        return self.net(h)[:, :, None, None]


def test_a_few_thousand_steps_on_a_2d_mixture_recover_its_modes():
    torch.manual_seed(0)
    modes = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])
    model = Diffusion(Mlp(), RectifiedFlow("uniform"))
    text = TextBatch(torch.zeros(256, 1, 2), torch.ones(256, 1, dtype=torch.bool))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2000):
        x0 = modes[torch.randint(0, 4, (256,))] + 0.05 * torch.randn(256, 2)
        loss = model.loss(x0[:, :, None, None], text)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model.sample(text, torch.Generator().manual_seed(1), sampler="heun", steps=20)
    points = out.flatten(1)
    nearest = torch.cdist(points, modes).min(1)
    assert (nearest.values < 0.2).float().mean() > 0.8  # modes' std is 0.05
    share = torch.bincount(nearest.indices, minlength=4).float() / len(points)
    assert (share > 0.15).all(), share


class Counting(nn.Module):
    image_size, image_channels = 4, 3

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.batches = []

    def forward(self, x, t, text):
        self.batches.append(x.shape[0])
        return x * self.w


@pytest.mark.parametrize("sampler,calls", [("euler", 5), ("heun", 9), ("dpmpp2m", 5)])
def test_guidance_is_one_batched_pass_per_evaluation(sampler, calls):
    backbone = Counting()
    model = Diffusion(backbone, RectifiedFlow())
    text = TextBatch(torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.bool))
    null = TextBatch(torch.randn(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    model.sample(text, null_text=null, guidance=2.0, sampler=sampler, steps=5)
    assert backbone.batches == [6] * calls


@pytest.mark.parametrize("kwargs,message", [(dict(sampler="ddim"), "sampler"),
                                            (dict(steps=0), "steps"),
                                            (dict(sampler="euler", eta=0.5), "eta")])
def test_bad_sampling_options(kwargs, message):
    model = Diffusion(Counting(), RectifiedFlow())
    text = TextBatch(torch.randn(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=message):
        model.sample(text, **kwargs)
