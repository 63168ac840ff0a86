"""Noise schedules and the forward process q(x_t | x_0).

A schedule is the table of cumulative signal levels abar_t for t = 0..T-1. Everything else
derives from it:

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    SNR(t)       = abar_t / (1 - abar_t)
    sigma(t)     = sqrt((1 - abar_t) / abar_t) = 1 / sqrt(SNR)

Samplers work in the "sigma" (variance-exploding) view of the same process, x = x_0 + sigma eps,
which is the variance-preserving x_t divided by sqrt(abar_t).

Two continuous processes are written in the same sigma view, each as a table of T sigmas (so
every sampler, spacing and distillation works on them unchanged) plus the preconditioning
of its network, D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, Table 1):

- "edm": x = x0 + sigma eps with EDM's c_skip, c_out, c_in, c_noise for data of std
  sigma_data; training sigmas log-normal, ln sigma ~ N(p_mean, p_std^2).
- "flow" (rectified flow, SD3): x_t = (1 - t) x0 + t eps, the network predicts eps - x0.
  x_t / (1 - t) = x0 + sigma eps with sigma = t / (1 - t): a sigma-view process whose
  "model view" is x_t = x / (1 + sigma). Training t logit-normal, logit t ~ N(p_mean, p_std^2);
  SD3's resolution shift t -> shift t / (1 + (shift - 1) t) is sigma -> shift * sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .configs import DictConfig

SCHEDULES = ("linear", "cosine", "scaled_linear")
CONTINUOUS = ("edm", "flow")  # processes of their own objective (`--objective edm|flow`)
# EDM's (Karras et al. 2022) and SD3's (Esser et al. 2024) settings
CONTINUOUS_DEFAULTS = {
    "edm": {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2},
    "flow": {"shift": 1.0, "p_mean": 0.0, "p_std": 1.0},
}
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
class ScheduleConfig(DictConfig):
    kind: str = "cosine"
    num_steps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    # edm and flow only (None: CONTINUOUS_DEFAULTS)
    sigma_min: float | None = None
    sigma_max: float | None = None
    sigma_data: float | None = None
    p_mean: float | None = None  # the training noise levels' distribution (see the top)
    p_std: float | None = None
    shift: float | None = None

    def setting(self, name: str) -> float:
        """An edm or flow setting, or its default."""
        value = getattr(self, name)
        return CONTINUOUS_DEFAULTS[self.kind][name] if value is None else value


class NoiseSchedule:
    """The discrete schedule (T steps) and conversions between timesteps and sigmas."""

    def __init__(self, config: ScheduleConfig | None = None, **kwargs) -> None:
        config = config or ScheduleConfig(**kwargs)
        if config.kind not in SCHEDULES + CONTINUOUS:
            raise ValueError(
                f"unknown schedule {config.kind!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if config.num_steps < 2:
            raise ValueError("a schedule needs at least 2 steps")
        self.config = config
        if config.kind in CONTINUOUS:
            self._set_sigmas(continuous_sigmas(config))
            self.betas = torch.cat(
                [
                    1 - self.alphas_cumprod[:1],
                    1 - self.alphas_cumprod[1:] / self.alphas_cumprod[:-1],
                ]
            ).float()
            return
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

    def _set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas.double()
        self.log_sigmas = self.sigmas.log()
        self.alphas_cumprod = 1 / (1 + self.sigmas**2)

    @property
    def kind(self) -> str:
        return self.config.kind

    def noise_std(self, sigma: float) -> float:
        """What the model's own view calls unit noise, in the sigma view: sqrt(1 + sigma^2)
        (variance preserving, and EDM), 1 + sigma (flow: x = x_t (1 + sigma))."""
        return 1 + sigma if self.kind == "flow" else (1 + sigma**2) ** 0.5

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) at `sigma` for the edm and flow processes:
        D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)."""
        if self.kind == "edm":
            return edm_preconditioning(sigma, self.config.setting("sigma_data"))
        if self.kind == "flow":
            return flow_preconditioning(sigma)
        raise ValueError(f"the {self.kind} schedule has no preconditioning")

    def training_sigmas(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Noise levels of n training samples: log-normal (edm), shifted logit-normal (flow)."""
        c = self.config
        z = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float64)
        z = c.setting("p_mean") + c.setting("p_std") * z
        if self.kind == "edm":
            return z.exp().float()
        return (c.setting("shift") * z.exp()).float()  # t / (1 - t) for t = sigmoid(z)

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


def continuous_sigmas(config: ScheduleConfig) -> torch.Tensor:
    """The ascending table of T sigmas of an edm or flow process: edm's are Karras et al.'s
    spacing between sigma_min and sigma_max; flow's are evenly spaced in t, t_k = k / (T + 1)
    for k = 1..T (t = 1, pure noise, is sigma = infinity), then shifted."""
    T = config.num_steps
    if config.kind == "edm":
        return karras_sigmas(T, config.setting("sigma_min"), config.setting("sigma_max")).flip(0)
    t = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
    return config.setting("shift") * t / (1 - t)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """Karras et al. 2022, Table 1: unit-variance network input and target at every sigma;
    D is the identity at sigma = 0 and the data mean's estimate (c_skip -> 0) as sigma grows."""
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = 1 / total.sqrt()
    c_noise = sigma.clamp(min=1e-20).log() / 4
    return c_skip, c_out, c_in, c_noise


def flow_preconditioning(sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flow matching in the sigma view: the network sees x_t = x / (1 + sigma) at time
    1000 t, t = sigma / (1 + sigma), and predicts v = eps - x0, so x0 = x_t - t v."""
    t = sigma / (1 + sigma)
    return 1 - t, -t, 1 - t, 1000 * t


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho
