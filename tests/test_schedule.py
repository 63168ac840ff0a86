import math

import pytest
import torch

from difusion.schedule import NoiseSchedule, karras_sigmas


@pytest.mark.parametrize("kind", ["linear", "cosine", "scaled_linear"])
def test_alphas_cumprod_monotone_in_unit_interval(kind):
    abar = NoiseSchedule(kind=kind).alphas_cumprod
    assert abar.shape == (1000,)
    assert (abar[1:] < abar[:-1]).all()
    assert abar.min() >= 0 and abar.max() < 1


def test_linear_known_values():
    s = NoiseSchedule(kind="linear")
    assert s.betas[0] == pytest.approx(1e-4)
    assert s.betas[-1] == pytest.approx(0.02)
    # abar_T = prod(1 - beta_t) for the DDPM schedule is about 4.04e-5
    assert float(s.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-3)
    assert float(s.alphas_cumprod[0]) == pytest.approx(1 - 1e-4)


def test_cosine_follows_its_formula():
    s = NoiseSchedule(kind="cosine")

    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 100, 500, 900):
        assert float(s.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert float(s.betas.max()) == pytest.approx(0.999)  # clipped at the end


def test_scaled_linear_endpoints():
    s = NoiseSchedule(kind="scaled_linear")
    assert float(s.betas[0]) == pytest.approx(0.00085)
    assert float(s.betas[-1]) == pytest.approx(0.012)
    assert float(s.betas[500].sqrt()) == pytest.approx((0.00085**0.5 + 0.012**0.5) / 2, rel=1e-3)


def test_zero_terminal_snr():
    s = NoiseSchedule(kind="scaled_linear", zero_terminal_snr=True)
    base = NoiseSchedule(kind="scaled_linear")
    assert float(s.alphas_cumprod[-1]) == 0.0
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-9)
    assert float(s.snr(torch.tensor([999]))) == 0.0


def test_snr_and_sigma_relations():
    s = NoiseSchedule(kind="linear")
    t = torch.tensor([0, 10, 500, 999])
    snr = s.snr(t)
    assert torch.allclose(s.sigmas[t], snr.rsqrt())
    assert torch.allclose(s.t_to_sigma(t.double()), s.sigmas[t])
    t_frac = torch.tensor([0.0, 3.25, 400.5, 999.0], dtype=torch.float64)
    assert torch.allclose(s.sigma_to_t(s.t_to_sigma(t_frac)), t_frac, atol=1e-6)


def test_q_sample_statistics():
    torch.manual_seed(0)
    s = NoiseSchedule(kind="cosine")
    x0 = torch.full((200_000,), 0.7)
    for t in (0, 250, 700):
        xt = s.q_sample(x0, torch.full((200_000,), t))
        abar = float(s.alphas_cumprod[t])
        assert xt.mean().item() == pytest.approx(abar**0.5 * 0.7, abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - abar, rel=2e-2, abs=1e-5)


def test_timestep_spacings_match_diffusers_conventions():
    s = NoiseSchedule(kind="linear")
    assert s.timesteps(10, "leading").tolist() == list(range(900, -1, -100))
    assert s.timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    assert s.timesteps(4, "linspace").tolist() == [999, 749, 500, 250]
    sig = s.sample_sigmas(10, "karras")
    assert sig[-1] == 0 and len(sig) == 11
    assert float(sig[0]) == pytest.approx(s.sigma_max, rel=1e-5)
    assert float(sig[-2]) == pytest.approx(s.sigma_min, rel=1e-5)
    with pytest.raises(ValueError):
        s.timesteps(0)
    with pytest.raises(ValueError):
        s.timesteps(10, "sideways")


def test_karras_rho_spacing():
    sig = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    inv = sig ** (1 / 7)
    assert torch.allclose(inv[1:] - inv[:-1], (inv[1] - inv[0]).expand(4))


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule(kind="quadratic")
