import pytest
import torch

from difusion.denoiser import Denoiser, bind, clamped
from difusion.samplers import SAMPLERS, get_sampler, initial_noise
from difusion.schedule import NoiseSchedule


class ToyEps(torch.nn.Module):
    """A fixed analytic noise predictor, smooth in x and t: near the optimal one for data
    N(0, 0.5^2) under a schedule with abar = exp(-t / 150), plus a nonlinear term."""

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.dim() - 1)))
        abar = torch.exp(-t / 150)
        gain = (1 - abar).sqrt() / (0.25 * abar + 1 - abar)
        return gain * x + 0.1 * torch.sin(2 * x + t / 250)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def in_float64(scheduler):
    """diffusers keeps abar in float32 and forms 1 - abar in float32, which near t=0 carries a
    relative error of ~1e-4 by itself; compare algorithms, not that rounding, in float64."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def run_diffusers(scheduler, steps, z, generator=None):
    model = ToyEps()
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        kw = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, x, **kw).prev_sample
    return x


def run_ours(name, steps, spacing, z, schedule, clip=False, generator=None, **kw):
    denoise = bind(Denoiser(ToyEps(), schedule, "eps"), None)
    if clip:
        denoise = clamped(denoise)
    sigmas = schedule.sample_sigmas(steps, spacing)
    x = z * (1 + float(sigmas[0]) ** 2) ** 0.5
    return get_sampler(name)(denoise, x, sigmas, generator=generator, **kw)


Z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Z64 = Z.double()


@pytest.mark.parametrize("steps", [1000, 50])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_diffusers(steps, clip):
    from diffusers import DDPMScheduler

    ref = run_diffusers(
        in_float64(DDPMScheduler(beta_schedule="linear", clip_sample=clip)),
        steps,
        Z64,
        generator=torch.Generator().manual_seed(7),
    )
    ours = run_ours(
        "ddpm",
        steps,
        "leading",
        Z64,
        NoiseSchedule(kind="linear"),
        clip=clip,
        generator=torch.Generator().manual_seed(7),
    )
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_matches_diffusers(eta, beta_schedule):
    from diffusers import DDIMScheduler

    betas = {"scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012}}.get(beta_schedule, {})
    sched = in_float64(DDIMScheduler(beta_schedule=beta_schedule, clip_sample=False, **betas))
    sched.set_timesteps(25)
    model = ToyEps()
    gen = torch.Generator().manual_seed(3)
    x = Z64.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, eta=eta, generator=gen).prev_sample
    kind = {"squaredcos_cap_v2": "cosine"}.get(beta_schedule, beta_schedule)
    ours = run_ours(
        "ddim",
        25,
        "leading",
        Z64,
        NoiseSchedule(kind=kind),
        generator=torch.Generator().manual_seed(3),
        eta=eta,
    )
    assert rel_err(ours, x) < 1e-5


@pytest.mark.parametrize("steps", [10, 20, 30])
def test_dpmpp_2m_matches_diffusers(steps):
    from diffusers import DPMSolverMultistepScheduler

    ref = run_diffusers(DPMSolverMultistepScheduler(beta_schedule="linear"), steps, Z)
    ours = run_ours("dpmpp_2m", steps, "linspace", Z, NoiseSchedule(kind="linear"))
    assert rel_err(ours, ref) < 1e-5


def test_callback_sees_every_step_and_trajectory_ends_at_result():
    schedule = NoiseSchedule(kind="cosine")
    seen = []
    for name in SAMPLERS:
        seen.clear()
        out = run_ours(name, 6, "trailing", Z, schedule, callback=seen.append)
        assert [s["i"] for s in seen] == list(range(6))
        sig = [s["sigma"] for s in seen]
        assert sig == sorted(sig, reverse=True)
        assert seen[-1]["x0"].shape == out.shape


def gaussian_denoiser(mu, s):
    """Exact E[x0 | x] for x0 ~ N(mu, s^2) and x = x0 + sigma eps."""

    def denoise(x, sigma):
        sigma = torch.as_tensor(sigma).float()
        return mu + s**2 / (s**2 + sigma**2) * (x - mu)

    return denoise


@pytest.mark.parametrize(
    "name,steps",
    [
        ("ddpm", 1000),
        ("ddim", 250),
        ("euler", 250),
        ("euler_ancestral", 1000),
        ("heun", 60),
        ("dpmpp_2m", 60),
    ],
)
@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_samplers_converge_to_gaussian_data(name, steps, spacing):
    mu, s = 0.3, 0.5
    schedule = NoiseSchedule(kind="linear")
    sigmas = schedule.sample_sigmas(steps, spacing)
    gen = torch.Generator().manual_seed(0)
    x = initial_noise((40_000,), float(sigmas[0]), generator=gen)
    out = get_sampler(name)(gaussian_denoiser(mu, s), x, sigmas, generator=gen)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, rel=0.02)


def test_heun_stays_stable_over_the_huge_first_step_of_cosine():
    """sigma_max of the cosine schedule is ~4096: a slope-averaging Heun explodes there."""
    schedule = NoiseSchedule(kind="cosine")
    sigmas = schedule.sample_sigmas(5, "trailing")
    x = initial_noise((40_000,), float(sigmas[0]), generator=torch.Generator().manual_seed(0))
    euler = get_sampler("euler")(gaussian_denoiser(0.3, 0.5), x, sigmas).std().item()
    heun = get_sampler("heun")(gaussian_denoiser(0.3, 0.5), x, sigmas).std().item()
    assert abs(heun - 0.5) < abs(euler - 0.5) < 0.2


def test_higher_order_samplers_converge_faster():
    """At equal steps, Heun and DPM-Solver++ land closer to the data std than Euler."""
    schedule = NoiseSchedule(kind="linear")
    sigmas = schedule.sample_sigmas(40, "trailing")
    x = initial_noise((40_000,), float(sigmas[0]), generator=torch.Generator().manual_seed(0))
    err = {
        name: abs(get_sampler(name)(gaussian_denoiser(0.3, 0.5), x, sigmas).std().item() - 0.5)
        for name in ("euler", "heun", "dpmpp_2m")
    }
    assert err["heun"] < err["euler"] and err["dpmpp_2m"] < err["euler"]


def test_clamped_and_dynamic_threshold():
    big = lambda x, sigma: x * 3  # noqa: E731
    x = torch.linspace(-1, 1, 1000).reshape(1, 1000)
    assert clamped(big)(x, 1.0).abs().max() == 1.0
    dyn = clamped(big, threshold=0.9)(x, 1.0)
    assert dyn.abs().max() == pytest.approx(1.0)
    # dynamic thresholding rescales rather than saturating: fewer values stuck at the limit
    assert (dyn.abs() >= 0.999).sum() < (clamped(big)(x, 1.0).abs() >= 0.999).sum()


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("plms")


def gaussian_ode(mu: float = 0.3, s: float = 0.5):
    """Data N(mu, s^2): the exact denoiser is linear, and the probability-flow ODE
    dx/dsigma = (x - D(x, sigma)) / sigma is solved in closed form, x - mu growing as
    sqrt(s^2 + sigma^2)."""

    def denoiser(x, sigma):
        return mu + s**2 / (s**2 + torch.as_tensor(sigma, dtype=x.dtype) ** 2) * (x - mu)

    def solution(x, sigma_from, sigma_to):
        return mu + ((s**2 + sigma_to**2) / (s**2 + sigma_from**2)) ** 0.5 * (x - mu)

    return denoiser, solution


def flow_sigmas(steps: int, t_from: float = 0.9, t_to: float = 0.1) -> torch.Tensor:
    """sigma = t / (1 - t) of flow matching's evenly spaced times."""
    t = torch.linspace(t_from, t_to, steps + 1, dtype=torch.float64)
    return t / (1 - t)


@pytest.mark.parametrize(
    "name, order",
    [("euler", 1), ("heun", 2), ("heun_flow", 2), ("heun_edm", 2), ("dpmpp_2m", 2)],
)
def test_flow_samplers_integrate_a_linear_ode_to_their_order(name, order):
    """Halving the step on flow matching's time grid divides the error by 2^order."""
    denoiser, solution = gaussian_ode()
    x = torch.linspace(-3, 3, 101, dtype=torch.float64) * 9
    sample = get_sampler(name)
    errors = []
    for steps in (16, 32, 64):
        sigmas = flow_sigmas(steps)
        exact = solution(x, sigmas[0], sigmas[-1])
        errors.append((sample(denoiser, x, sigmas) - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 2**order * 0.85 < coarse / fine < 2**order * 1.15, errors


def test_euler_in_the_sigma_view_is_flow_matchings_euler():
    """x_t = x / (1 + sigma), t = sigma / (1 + sigma): a DDIM step in the sigma view is the
    Euler step x_t + (t' - t) v of flow matching, v = (x_t - x0) / t."""
    denoiser, _ = gaussian_ode()
    sigmas = flow_sigmas(7, 0.95, 0.05)
    x = torch.linspace(-3, 3, 11, dtype=torch.float64) * 19
    ours = get_sampler("euler")(denoiser, x, sigmas)
    x_t = x / (1 + sigmas[0])
    for sigma, sigma_next in zip(sigmas, sigmas[1:], strict=False):
        t, t_next = sigma / (1 + sigma), sigma_next / (1 + sigma_next)
        v = (x_t - denoiser(x_t * (1 + sigma), sigma)) / t
        x_t = x_t + (t_next - t) * v
    assert torch.allclose(ours / (1 + sigmas[-1]), x_t, rtol=1e-12, atol=1e-12)
