"""DPM-Solver++(2M) and DDIM against independent references: the closed-form probability-flow
ODE of Gaussian data, and diffusers' DPMSolverMultistepScheduler."""
import math

import pytest
import torch
import torch.nn as nn

from diffusion_helpers import gaussian
from tti.models.diffusion import Guided
from tti.models.objectives.gaussian import make_betas
from tti.models.objectives.samplers import ddim_step, dpmpp2m_step
from tti.text.batch import TextBatch

MU, S = 0.1, 0.4  # data N(MU, S^2) per pixel: its samples stay inside the [-1, 1] clip


def gaussian_x0(x: torch.Tensor, ab) -> torch.Tensor:
    """E[x0 | x_t] for data N(MU, S^2): the exact denoiser (float64)."""
    ab = torch.as_tensor(ab, dtype=torch.float64)
    return MU + ab.sqrt() * S ** 2 / (ab * S ** 2 + 1 - ab) * (x.double() - ab.sqrt() * MU)


def gaussian_ode(x_from: torch.Tensor, ab_from: float, ab_to: float) -> torch.Tensor:
    """The probability-flow ODE's exact solution for data N(MU, S^2): x_t stays at the same
    standardised position z in the marginal N(sqrt(ab) MU, ab S^2 + 1 - ab) at every level."""
    z = (x_from.double() - math.sqrt(ab_from) * MU) / math.sqrt(ab_from * S ** 2 + 1 - ab_from)
    return math.sqrt(ab_to) * MU + math.sqrt(ab_to * S ** 2 + 1 - ab_to) * z


class ExactGaussianUNet(nn.Module):
    """The exact denoiser of N(MU, S^2) data, output as eps, v or x0 at timesteps t (floats holding integers)."""

    def __init__(self, prediction: str):
        super().__init__()
        self.prediction = prediction
        self.alphas_cumprod = None  # set once the Diffusion around it exists

    def forward(self, x, t, text):
        ab = self.alphas_cumprod[t.long()].double().view(-1, 1, 1, 1)
        x0 = gaussian_x0(x, ab)
        eps = (x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        return {"x0": x0, "eps": eps, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction].float()


def observed_orders(errors: list[float]) -> list[float]:
    """log2 of the error ratio per doubling of the steps: 1 for a first-order solver, 2 for second."""
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def solve_on_lambda_grid(step_fn, steps: int, x: torch.Tensor) -> torch.Tensor:
    """Integrate from lambda = -4 to +3 (half log-SNR) in `steps` equal steps with the exact
    Gaussian denoiser, calling step_fn(x, x0, ab_s, ab_t, state) -> (x, state)."""
    lambdas = torch.linspace(-4.0, 3.0, steps + 1, dtype=torch.float64)
    abs_ = torch.sigmoid(2 * lambdas).tolist()  # ab = sigmoid(2 lambda)
    state = None
    for ab_s, ab_t in zip(abs_, abs_[1:]):
        x, state = step_fn(x, gaussian_x0(x, ab_s), ab_s, ab_t, state)
    return x


def test_dpmpp2m_is_second_order_and_ddim_first_order_on_the_exact_ode():
    """On an even grid in lambda, with the exact denoiser, the error against the closed-form
    ODE solution falls 4x per doubling of the steps for DPM-Solver++(2M), 2x for DDIM."""
    x = torch.linspace(-2.0, 2.0, 101, dtype=torch.float64)
    exact = gaussian_ode(x, torch.sigmoid(torch.tensor(-8.0)).item(), torch.sigmoid(torch.tensor(6.0)).item())
    no_noise = lambda: pytest.fail("eta = 0 draws no noise")
    solvers = {
        "dpmpp2m": lambda x, x0, s, t, prev: dpmpp2m_step(x, x0, s, t, prev, 0.0, no_noise),
        "ddim": lambda x, x0, s, t, prev: (ddim_step(x, x0, s, t, 0.0, no_noise), None),
    }
    orders = {}
    for name, step_fn in solvers.items():
        errors = [(solve_on_lambda_grid(step_fn, n, x) - exact).abs().max().item() for n in (32, 64, 128, 256)]
        orders[name] = observed_orders(errors)
    assert all(1.9 < p < 2.1 for p in orders["dpmpp2m"]), orders
    assert all(0.9 < p < 1.1 for p in orders["ddim"]), orders


@pytest.mark.parametrize("prediction,schedule,shift", [("eps", "cosine", 1.0), ("v", "cosine", 2.0),
                                                        ("x0", "linear", 1.0)])
def test_sampler_error_on_gaussian_data_through_diffusion_sample(prediction, schedule, shift):
    """The road users drive: Diffusion.sample with the exact denoiser in each parameterisation,
    on the evenly spaced timesteps. Reference: the exact ODE from x_T to the last level visited,
    then the exact denoiser (every sampler's last step lands on its data prediction). 2M's
    error is well below DDIM's and falls at order ~2 as the steps double (DDIM's at ~1)."""
    unet = ExactGaussianUNet(prediction)
    d = gaussian(unet, schedule=schedule, timesteps=1000, prediction=prediction, image_size=4,
                  shift=shift)
    unet.alphas_cumprod = d.objective.alphas_cumprod
    ab = d.objective.alphas_cumprod.double().tolist()
    text = TextBatch(torch.zeros(2, 1, 8), torch.ones(2, 1, dtype=torch.bool))
    x_T = torch.linspace(-2.0, 2.0, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    errors = {}
    for sampler in ("ddim", "dpmpp2m"):
        errors[sampler] = []
        for n in (10, 20, 40, 160, 640):
            last = d.objective.sampling_steps(sampler, n)[-1]
            reference = gaussian_x0(gaussian_ode(x_T, ab[-1], ab[last]), ab[last])
            out = d.sample(text, sampler=sampler, steps=n, noise=x_T)
            errors[sampler].append((out.double() - reference).abs().max().item())
    for ddim, dpm in zip(errors["ddim"], errors["dpmpp2m"]):
        assert dpm < ddim / 2, errors
    # Over 160 -> 640 steps. Not exactly 2: the even grid's last steps always span the same
    # ratio of noise levels (t_1 -> 2 t_1), so the order approaches 2 only slowly.
    ddim_order = math.log2(errors["ddim"][-2] / errors["ddim"][-1]) / 2
    dpm_order = math.log2(errors["dpmpp2m"][-2] / errors["dpmpp2m"][-1]) / 2
    assert 0.8 < ddim_order < 1.2 and dpm_order > 1.6, errors



@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_dpmpp2m_keeps_the_marginals_of_point_mass_data_for_every_eta(eta):
    """Data = one point x*: the denoiser is exactly x* at every level, so one step of the
    reverse-SDE family is exact and must carry x_s ~ N(alpha_s x*, sigma_s^2) to
    N(alpha_t x*, sigma_t^2). The step is x_t = A x_s + B x* + C z; A, B, C are read off
    by feeding unit inputs, then the mean (A alpha_s + B = alpha_t) and the variance
    (A^2 sigma_s^2 + C^2 = sigma_t^2) are checked, with and without a previous step."""
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for ab_s, ab_t in [(0.01, 0.2), (0.3, 0.35), (0.5, 0.99)]:
        for previous in (None, (0.5 * math.log(ab_s / (1 - ab_s)) - 0.7, one)):
            def step(x, x0, z):  # the previous x0 is x* = x0 too: the 2M correction must vanish
                prev = None if previous is None else (previous[0], x0)
                return dpmpp2m_step(x, x0, ab_s, ab_t, prev, eta, lambda: z)[0].item()
            a, b, c = step(one, zero, zero), step(zero, one, zero), step(zero, zero, one)
            assert a * math.sqrt(ab_s) + b == pytest.approx(math.sqrt(ab_t), rel=1e-12)
            assert a * a * (1 - ab_s) + c * c == pytest.approx(1 - ab_t, rel=1e-12)
            assert (c == 0) == (eta == 0)


def test_dpmpp2m_with_noise_uses_per_sample_generators():
    """eta > 0: image i depends on its own generator only, not on its batch."""
    d = gaussian(tiny_unet(), timesteps=50, image_size=16)
    text = TextBatch(torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = d.sample(text, gens([1, 2, 3]), sampler="dpmpp2m", steps=6, eta=1.0)
    alone = d.sample(text.index([2]), gens([3]), sampler="dpmpp2m", steps=6, eta=1.0)
    torch.testing.assert_close(batch[2:], alone, atol=1e-5, rtol=0)
    other = d.sample(text, gens([1, 2, 4]), sampler="dpmpp2m", steps=6, eta=1.0)
    assert torch.equal(other[:2], batch[:2]) and not torch.allclose(other[2], batch[2])

# ------------------------------------------------------------------ diffusers as the reference


def tiny_unet():
    from test_diffusion import tiny_unet as random_unet

    return random_unet()


# eps is paired with the linear schedule: under the cosine one ab[T-1] ~ 1e-8, and x0 =
# (x - sigma eps) / sqrt(ab) there cancels away every digit float32 has, in both codes alike.
@pytest.mark.parametrize("prediction,schedule,shift,eta", [
    ("eps", "linear", 1.0, 0.0), ("v", "cosine", 2.0, 0.0), ("x0", "cosine", 1.0, 0.0),
    ("v", "cosine", 2.0, 1.0)])
@pytest.mark.parametrize("steps", [4, 20])
def test_dpmpp2m_equals_diffusers_dpmsolver_multistep(prediction, schedule, shift, eta, steps):
    """Same betas, timesteps and (guided) model function: every step's x0 and the final image
    equal diffusers' DPMSolverMultistepScheduler (dpmsolver++ for eta 0, sde-dpmsolver++ for
    eta 1, solver_order 2, x0 clipped to [-1, 1] by its thresholding with max value 1)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (requirements-dev.txt) is the reference")
    T, guidance = 200, 2.5
    d = gaussian(tiny_unet(), schedule=schedule, timesteps=T, prediction=prediction, image_size=16,
                  shift=shift)
    text = TextBatch(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    null = TextBatch(torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))
    images, trajectory = d.sample(text, torch.Generator().manual_seed(5), null_text=null,
                                  guidance=guidance, sampler="dpmpp2m", steps=steps, eta=eta,
                                  return_trajectory=True)

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=make_betas(schedule, T, shift).numpy(),
        prediction_type={"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction],
        algorithm_type="sde-dpmsolver++" if eta else "dpmsolver++", solver_order=2,
        thresholding=True, sample_max_value=1.0)  # s = max(1, quantile) clipped to 1: a plain clip
    timesteps = d.objective.sampling_steps("dpmpp2m", steps)
    scheduler.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(5)  # the draws in our order: x_T, then each step's noise
    x = torch.randn(2, 3, 16, 16, generator=g)
    null = null.repeat(2)
    for i, step in enumerate(timesteps):
        t = torch.full((2,), step, dtype=torch.long)
        with torch.no_grad():
            output = Guided(d.backbone, text, null, guidance)(x, t.float())
        last = i == len(timesteps) - 1
        noise = torch.randn(2, 3, 16, 16, generator=g) if eta and not last else torch.zeros(2, 3, 16, 16)
        x = scheduler.step(output, step, x, variance_noise=noise).prev_sample
        # float32 rounding, which eps -> x0 amplifies by 1 / sqrt(ab) (~180 here at t = T - 1)
        torch.testing.assert_close(trajectory[i], scheduler.model_outputs[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(images, x.clamp(-1, 1), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ the command lines


def test_sample_and_export_clis_take_dpmpp2m(tmp_path_factory):
    """`--sampler dpmpp2m` on tti.sample (grid + one GIF frame per step) and tti.export
    (recorded in export_info.json)."""
    import json
    import os

    from PIL import Image

    from tiny_run import train_tiny_run
    from tti import export, sample

    run = train_tiny_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("cli")
    sample.main(["--checkpoint", run, "--caption", "a large red circle", "--n", "2", "--device", "cpu",
                 "--sampler", "dpmpp2m", "--steps", "3", "--eta", "0.5",
                 "--out", str(out / "grid.png"), "--gif", str(out / "denoise.gif")])
    with Image.open(out / "denoise.gif") as gif:
        assert gif.n_frames == 3
    export.main(["--checkpoint", run, "--out-dir", str(out / "export"), "--n", "2", "--device", "cpu",
                 "--sampler", "dpmpp2m", "--steps", "3"])
    info = json.load(open(os.path.join(out, "export", "export_info.json")))
    assert info["sampler_options"]["sampler"] == "dpmpp2m" and info["sampler_options"]["steps"] == 3


@pytest.mark.parametrize("objective, wrong, known", [
    ("gaussian", "euler", "ddim, dpmpp2m, ddpm"), ("flow", "ddim", "euler, heun, dpmpp2m")])
def test_a_sampler_of_another_objective_is_one_line(objective, wrong, known, tmp_path_factory,
                                                    monkeypatch, capsys):
    """A sampler of the other objective: the registry's samplers for the checkpoint's own
    objective are named, in one line, before anything is drawn."""
    from test_cli import assert_one_line, run_module
    from tiny_run import train_tiny_run

    run = train_tiny_run(tmp_path_factory, [f"model.objective={objective}"])
    out = tmp_path_factory.mktemp("wrong_sampler") / "grid.png"
    code, err = run_module("tti.sample", ["--checkpoint", run, "--device", "cpu", "--sampler",
                                          wrong, "--out", str(out)], monkeypatch, capsys)
    assert_one_line(code, err, "tti.sample", f"--sampler {wrong}", known)
    assert not out.exists()
