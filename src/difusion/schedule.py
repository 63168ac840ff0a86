"""Noise schedules and the forward process q(x_t | x_0).

A schedule is the table of cumulative signal levels abar_t for t = 0..T-1. Everything else
derives from it:

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    SNR(t)       = abar_t / (1 - abar_t)
    sigma(t)     = sqrt((1 - abar_t) / abar_t) = 1 / sqrt(SNR)

Samplers work in the "sigma" (variance-exploding) view of the same process, x = x_0 + sigma eps,
which is the variance-preserving x_t divided by sqrt(abar_t).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

SCHEDULES = ("linear", "cosine", "scaled_linear")
SPACINGS = ("leading", "trailing", "linspace", "karras")


def linear_betas(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """DDPM (Ho et al. 2020): betas linear from 1e-4 to 0.02 over T=1000 (rescaled for other T)."""
    scale = 1000 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float32)


def scaled_linear_betas(
    num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021): abar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""

    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift and scale sqrt(abar) so the last step has SNR exactly 0."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"
    num_steps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class NoiseSchedule:
    """The discrete schedule (T steps) and conversions between timesteps and sigmas."""

    def __init__(self, config: ScheduleConfig | None = None, **kwargs) -> None:
        config = config or ScheduleConfig(**kwargs)
        if config.kind not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {config.kind!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if config.num_steps < 2:
            raise ValueError("a schedule needs at least 2 steps")
        self.config = config
        betas_range = {
            k: v
            for k, v in (("beta_start", config.beta_start), ("beta_end", config.beta_end))
            if v is not None
        }
        if config.kind == "linear":
            betas = linear_betas(config.num_steps, **betas_range)
        elif config.kind == "scaled_linear":
            betas = scaled_linear_betas(config.num_steps, **betas_range)
        else:
            betas = cosine_betas(config.num_steps)
        if config.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas.double())
        # The table is float32, as in the reference implementations: trained models and their
        # samplers agree on it to the last bit. Conversions from it are float64.
        self.betas = betas.float()
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0).double()
        # With zero terminal SNR the last sigma is infinite; like diffusers, keep it finite.
        abar = self.alphas_cumprod.clamp(min=2**-24)
        self.sigmas = ((1 - abar) / abar).sqrt()
        self.log_sigmas = self.sigmas.log()

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t.long()]
        return abar / (1 - abar)

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for integer timesteps t of shape [B]."""
        if noise is None:
            noise = torch.randn_like(x0)
        abar = self.alphas_cumprod.to(x0.device)[t.long()].to(x0.dtype)
        abar = abar.view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps, interpolated in log-sigma."""
        t = t.double().clamp(0, self.num_steps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep with this sigma: the inverse of t_to_sigma."""
        log_sigma = sigma.double().clamp(min=1e-12).log()
        table = self.log_sigmas.to(log_sigma.device)
        high = torch.searchsorted(table, log_sigma.contiguous()).clamp(1, self.num_steps - 1)
        low = high - 1
        w = ((log_sigma - table[low]) / (table[high] - table[low])).clamp(0, 1)
        return low + w

    def timesteps(self, steps: int, spacing: str = "trailing", offset: int = 0) -> torch.Tensor:
        """Descending timesteps for a sampler of `steps` steps, spaced as diffusers names it."""
        T = self.num_steps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and {T}, got {steps}")
        if spacing == "leading":
            ts = torch.arange(steps, dtype=torch.float64) * (T // steps) + offset
            ts = ts.flip(0)
        elif spacing == "trailing":
            ts = (torch.arange(T, 0, -T / steps, dtype=torch.float64)).round() - 1
        elif spacing == "linspace":
            step = (T - 1) / steps  # computed as numpy.linspace does, so halves round alike
            ts = (torch.arange(steps + 1, dtype=torch.float64) * step).round().flip(0)[:-1]
        else:
            raise ValueError(
                f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}"
            )
        return ts.clamp(0, T - 1)

    def sample_sigmas(
        self, steps: int, spacing: str = "trailing", offset: int = 0, final_sigma: float = 0.0
    ) -> torch.Tensor:
        """Descending sigmas for a sampler, ending with `final_sigma`: 0 (the clean image) by
        default; `sigma_min` reproduces diffusers' DDIM with `set_alpha_to_one=False`, whose
        last step goes to abar_0 rather than to 1."""
        if spacing == "karras":
            sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max)
        else:
            sigmas = self.t_to_sigma(self.timesteps(steps, spacing, offset))
        return torch.cat([sigmas, sigmas.new_full((1,), final_sigma)]).float()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho
