"""Diffusion: schedules, forward process, targets, samplers, guidance, loss, argument errors."""
import math

import pytest
import torch
import torch.nn as nn

from tti.models.backbones.unet import UNetConfig
from diffusion_helpers import gaussian
from tti.models.objectives.gaussian import make_betas
from tti.text.batch import TextBatch
from tti.models.backbones.unet import UNet


class TextMeanUNet(nn.Module):
    """Stub denoiser: outputs the mean of the real text tokens (plus an optional x term)."""

    def __init__(self, x_gain: float = 0.0):
        super().__init__()
        self.x_gain = x_gain
        self.calls: list[int] = []

    def forward(self, x, t, text):
        self.calls.append(x.shape[0])
        m = text.mask.float()
        mean = (text.tokens[..., 0] * m).sum(1) / m.sum(1).clamp(min=1)
        return mean[:, None, None, None].expand_as(x) + self.x_gain * x


def tiny_unet() -> UNet:
    unet = UNet(UNetConfig(channels=[16, 32], attn_resolutions=[8], head_dim=16), image_size=16, context_dim=8)
    with torch.no_grad():  # random weights everywhere, so the output depends on every input
        for p in unet.parameters():
            p.normal_(0.0, 0.1)
    return unet


def captions(values: list[float], dim: int = 8) -> TextBatch:
    tokens = torch.tensor(values)[:, None, None].expand(len(values), 3, dim).clone()
    return TextBatch(tokens, torch.ones(len(values), 3, dtype=torch.bool))


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [200, 1000])
def test_alphas_cumprod_decreasing_and_in_open_unit_interval(schedule, timesteps):
    d = gaussian(TextMeanUNet(), schedule=schedule, timesteps=timesteps)
    ab = d.objective.alphas_cumprod.double()
    assert ab.shape == (timesteps,)
    assert (ab > 0).all() and (ab < 1).all()
    assert (ab[1:] < ab[:-1]).all()
    assert ab[-1] < 0.01  # close to pure noise at the last step


def test_linear_schedule_endpoints_scale_with_timesteps():
    torch.testing.assert_close(make_betas("linear", 1000)[[0, -1]],
                               torch.tensor([1e-4, 0.02], dtype=torch.float64))
    torch.testing.assert_close(make_betas("linear", 200)[[0, -1]],
                               torch.tensor([5e-4, 0.1], dtype=torch.float64))


def test_cosine_schedule_matches_closed_form_alpha_bar():
    T, s = 200, 0.008
    ab = torch.cumprod(1 - make_betas("cosine", T), 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in [0, 50, 100, 150]:  # steps before the 0.999 clip binds
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_shift_moves_log_snr_down_by_two_log_s(schedule):
    T = 200
    base = torch.cumprod(1 - make_betas(schedule, T), 0)
    assert torch.equal(make_betas(schedule, T, 1.0), make_betas(schedule, T))
    for s in (2.0, 4.0):
        ab = torch.cumprod(1 - make_betas(schedule, T, s), 0)
        # SNR = ab / (1 - ab) divided by s^2 at every step the 0.999 beta clip leaves alone.
        snr_ratio = (ab / (1 - ab)) / (base / (1 - base))
        torch.testing.assert_close(snr_ratio[:150], torch.full((150,), 1 / s ** 2, dtype=torch.float64))
        assert (ab[1:] < ab[:-1]).all() and ab[0] < 1 and ab[-1] > 0


# ------------------------------------------------------------------ forward process


def test_q_sample_mean_and_variance_match_closed_form():
    d = gaussian(TextMeanUNet(), schedule="cosine", timesteps=200)
    n = 200_000
    t_values = torch.tensor([0, 20, 100, 199])
    x0 = torch.tensor([0.9, -0.5, 0.3, 1.0])
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n, 4, generator=g)
    samples = d.objective.q_sample(x0.expand(n, 4).T, t_values, noise.T)  # rows = timesteps
    ab = d.objective.alphas_cumprod[t_values].double()
    sem = (1 - ab).sqrt() / math.sqrt(n)
    mean_err = (samples.double().mean(1) - ab.sqrt() * x0.double()).abs()
    assert (mean_err < 5 * sem).all()
    var_rel_err = (samples.double().var(1) / (1 - ab) - 1).abs()
    assert (var_rel_err < 5 * math.sqrt(2 / n)).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(schedule):
    d = gaussian(TextMeanUNet(), schedule=schedule, timesteps=100)
    betas = make_betas(schedule, 100)
    ab = torch.cumprod(1 - betas, 0)
    x0, x_t = torch.randn(5, 2), torch.randn(5, 2)
    t = torch.tensor([1, 2, 30, 77, 99])
    mean, var = d.objective.q_posterior(x0, x_t, t)
    # q(x_{t-1}|x0) = N(sqrt(ab') x0, 1 - ab') times q(x_t|x_{t-1}) = N(sqrt(1-b) x_{t-1}, b):
    # precisions add, and the mean is the precision-weighted combination.
    ab_prev, b = ab[t - 1][:, None], betas[t][:, None]
    precision = 1 / (1 - ab_prev) + (1 - b) / b
    ref_var = 1 / precision
    ref_mean = ref_var * (ab_prev.sqrt() * x0.double() / (1 - ab_prev)
                          + (1 - b).sqrt() * x_t.double() / b)
    torch.testing.assert_close(var.double().expand(5, 2), ref_var.expand(5, 2), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    # At t = 0 the posterior is the point mass at x0.
    mean0, var0 = d.objective.q_posterior(x0, x_t, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(mean0, x0)
    assert (var0 == 0).all()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_targets_and_conversions_round_trip(prediction):
    d = gaussian(TextMeanUNet(), timesteps=1000, prediction=prediction)
    x0, noise = torch.rand(6, 3, 4, 4) * 2 - 1, torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 10, 500, 900, 999])
    x_t = d.objective.q_sample(x0, t, noise)
    x0_back, eps_back = d.objective.x0_eps_from_output(x_t, t, d.objective.target(x0, t, noise))
    ab_t = d.objective.alphas_cumprod[t][:, None, None, None]
    eps_again = (x_t - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
    # Dividing by sqrt(ab) (x0 from eps near t = T) or sqrt(1 - ab) (eps from x0 near t = 0)
    # amplifies float32 rounding by that factor; allow for it, step by step.
    ab = d.objective.alphas_cumprod[t].double()
    amplification = torch.maximum(1 / ab.sqrt(), 1 / (1 - ab).sqrt())
    for got, want in [(x0_back, x0), (eps_back, noise), (eps_again, noise)]:
        err = (got - want).abs().flatten(1).amax(1).double()
        assert (err < 1e-5 * amplification).all(), (err, amplification)


def test_v_target_is_the_textbook_definition():
    d = gaussian(TextMeanUNet(), prediction="v")
    x0, noise, t = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2), torch.tensor([5, 400, 990])
    ab = d.objective.alphas_cumprod[t][:, None, None, None]
    torch.testing.assert_close(d.objective.target(x0, t, noise), ab.sqrt() * noise - (1 - ab).sqrt() * x0)


# ------------------------------------------------------------------ samplers


def test_ddim_eta0_is_a_deterministic_map_from_the_initial_noise():
    d = gaussian(tiny_unet(), timesteps=100, image_size=16)
    text = TextBatch(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    a = d.sample(text, generator=torch.Generator().manual_seed(3), steps=5)
    b = d.sample(text, generator=torch.Generator().manual_seed(3), steps=5)
    assert torch.equal(a, b)
    x_T = torch.randn(2, 3, 16, 16)
    c = d.sample(text, generator=torch.Generator().manual_seed(4), steps=5, noise=x_T)
    e = d.sample(text, generator=torch.Generator().manual_seed(5), steps=5, noise=x_T)
    assert torch.equal(c, e)
    assert a.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    # With eta > 0 the generator matters beyond x_T.
    f = d.sample(text, generator=torch.Generator().manual_seed(4), steps=5, noise=x_T, eta=1.0)
    h = d.sample(text, generator=torch.Generator().manual_seed(5), steps=5, noise=x_T, eta=1.0)
    assert not torch.allclose(f, h)


def test_ddim_with_all_steps_and_eta1_equals_ddpm():
    # With eta = 1 and every step, DDIM's update is the DDPM posterior mean and variance.
    d = gaussian(tiny_unet(), schedule="linear", timesteps=20, image_size=16)
    text = TextBatch(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
    ddpm = d.sample(text, generator=torch.Generator().manual_seed(7), sampler="ddpm")
    ddim = d.sample(text, generator=torch.Generator().manual_seed(7), sampler="ddim",
                    steps=20, eta=1.0)
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=0)


def test_ddim_matches_a_reference_loop():
    # Song et al. eq. 12 with eta = 0, written out here, with x0 clipped to [-1, 1].
    d = gaussian(tiny_unet(), timesteps=50, prediction="v", image_size=16)
    text = TextBatch(torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))
    x = torch.randn(1, 3, 16, 16)
    ours = d.sample(text, steps=5, noise=x)
    ab = d.objective.alphas_cumprod
    steps = [49, 39, 29, 19, 9]
    with torch.no_grad():
        for i, s in enumerate(steps):
            v = d.backbone(x, torch.tensor([s]), text)
            x0 = (ab[s].sqrt() * x - (1 - ab[s]).sqrt() * v).clamp(-1, 1)
            eps = (x - ab[s].sqrt() * x0) / (1 - ab[s]).sqrt()
            ab_prev = ab[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0)
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_trajectory_has_one_clipped_x0_per_step():
    d = gaussian(tiny_unet(), timesteps=30, image_size=16)
    text = TextBatch(torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))
    images, traj = d.sample(text, steps=4, return_trajectory=True)
    assert len(traj) == 4 and all(f.shape == images.shape for f in traj)
    assert all(f.min() >= -1 and f.max() <= 1 for f in traj)
    _, traj = d.sample(text, sampler="ddpm", return_trajectory=True)
    assert len(traj) == 30


def test_sample_restores_training_mode():
    d = gaussian(tiny_unet(), timesteps=10, image_size=16).train()
    d.sample(TextBatch(torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)), steps=2)
    assert d.training and d.backbone.training


# ------------------------------------------------------------------ guidance


def test_guidance_one_equals_the_conditional_model_and_skips_uncond():
    unet = tiny_unet()
    d = gaussian(unet, timesteps=40, image_size=16)
    text = TextBatch(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    null = TextBatch(torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    batches = []
    unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    plain = d.sample(text, generator=torch.Generator().manual_seed(0), steps=4)
    guided = d.sample(text, generator=torch.Generator().manual_seed(0), steps=4,
                      null_text=null, guidance=1.0)
    assert torch.equal(plain, guided)
    assert batches == [2] * 8


def test_guidance_runs_one_batched_pass_per_step():
    stub = TextMeanUNet()
    d = gaussian(stub, timesteps=40, prediction="x0", image_size=4)
    d.sample(captions([0.1, 0.2, 0.3]), null_text=captions([0.0]), guidance=3.0, steps=6)
    assert stub.calls == [6] * 6


@pytest.mark.parametrize("guidance", [0.0, 1.5, 4.0])
def test_guidance_combines_cond_and_uncond_outputs(guidance):
    # x0-prediction, one step: the sample is the guided prediction itself, clipped.
    stub = TextMeanUNet()
    d = gaussian(stub, timesteps=40, prediction="x0", image_size=4)
    cond, uncond = torch.tensor([0.4, -0.2]), torch.tensor([0.2, -0.1])
    out = d.sample(captions(cond.tolist()), null_text=captions(uncond.tolist()),
                   guidance=guidance, steps=1)
    expected = (uncond + guidance * (cond - uncond)).clamp(-1, 1)
    torch.testing.assert_close(out[:, 0, 0, 0], expected)


def test_guidance_with_v_prediction_is_linear_in_the_output():
    # For v-prediction x0 = sqrt(ab) x_t - sqrt(1-ab) v, so guiding v guides x0 the same way.
    stub = TextMeanUNet(x_gain=0.5)
    d = gaussian(stub, timesteps=40, prediction="v", image_size=4)
    x_T = torch.randn(1, 3, 4, 4) * 0.1
    cond, uncond, g = 0.3, 0.1, 2.0
    out = d.sample(captions([cond]), null_text=captions([uncond]), guidance=g, steps=1, noise=x_T)
    ab = d.objective.alphas_cumprod[39]
    v = uncond + g * (cond - uncond) + 0.5 * x_T
    torch.testing.assert_close(out, (ab.sqrt() * x_T - (1 - ab).sqrt() * v).clamp(-1, 1))


# ------------------------------------------------------------------ loss


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=[16, 32], attn_resolutions=[4], head_dim=16), image_size=8, context_dim=8)
    d = gaussian(unet, timesteps=100, image_size=8)
    images = (torch.rand(4, 3, 1, 1) * 2 - 1).expand(4, 3, 8, 8).clone()
    images[..., :4] *= -1  # two-colour images: easy to memorise
    text = TextBatch(torch.randn(4, 3, 8), torch.ones(4, 3, dtype=torch.bool))
    opt = torch.optim.AdamW(d.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = d(images, text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error(prediction):
    # Hang et al.: weight the x0 error by min(SNR, gamma), whatever the network predicts.
    gamma = 5.0
    d = gaussian(TextMeanUNet(), prediction=prediction, min_snr_gamma=gamma)
    x0, noise = torch.rand(5, 3, 4, 4) * 2 - 1, torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 50, 300, 700, 999])
    x_t = d.objective.q_sample(x0, t, noise)
    output = d.objective.target(x0, t, noise) + 0.1 * torch.randn_like(x0)
    weighted = d.objective.min_snr_weight(t) * (output - d.objective.target(x0, t, noise)).square().flatten(1).mean(1)
    ab = d.objective.alphas_cumprod[t]
    snr = ab / (1 - ab)
    x0_hat, _ = d.objective.x0_eps_from_output(x_t, t, output)
    reference = snr.clamp(max=gamma) * (x0_hat - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(weighted, reference, rtol=2e-3, atol=1e-6)


def test_loss_is_a_scalar_and_huge_gamma_is_no_weighting_for_eps():
    unet = tiny_unet()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    text = TextBatch(torch.randn(3, 2, 8), torch.ones(3, 2, dtype=torch.bool))
    plain = gaussian(unet, prediction="eps", image_size=16)
    weighted = gaussian(unet, prediction="eps", image_size=16, min_snr_gamma=1e12)
    torch.manual_seed(1)
    a = plain.loss(images, text)
    torch.manual_seed(1)
    b = weighted.loss(images, text)
    assert a.dim() == 0 and torch.isfinite(a)
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs,message", [
    (dict(schedule="sigmoid"), "schedule"),
    (dict(prediction="noise"), "prediction"),
    (dict(timesteps=0), "timesteps"),
    (dict(min_snr_gamma=0.0), "min_snr_gamma"),
    (dict(shift=0.0), "shift"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gaussian(tiny_unet(), **{"image_size": 16, **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    (dict(sampler="euler"), "sampler"),
    (dict(steps=101), "steps"),
    (dict(steps=0), "steps"),
    (dict(guidance=-1.0), "guidance"),
    (dict(guidance=2.0), "null_text"),
    (dict(eta=-0.5), "eta"),
])
def test_bad_sample_arguments(kwargs, message):
    d = gaussian(TextMeanUNet(), timesteps=100, image_size=4)
    with pytest.raises(ValueError, match=message):
        d.sample(captions([0.1]), **kwargs)


def test_bad_loss_inputs():
    d = gaussian(TextMeanUNet(), image_size=4)
    with pytest.raises(ValueError, match="images must be"):
        d.loss(torch.zeros(2, 3, 8, 8), captions([0.1, 0.2]))
    with pytest.raises(ValueError, match="captions"):
        d.loss(torch.zeros(2, 3, 4, 4), captions([0.1]))
