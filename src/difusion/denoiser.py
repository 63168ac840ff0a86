"""From a network to the one interface every sampler uses: denoiser(x, sigma, cond) -> x0.

x is the noisy sample in the sigma view (x = x0 + sigma * eps); the network sees the
variance-preserving input x / sqrt(1 + sigma^2) and the timestep of that sigma, and predicts
eps, v or x0 as it was trained to; or, for the edm and flow objectives, its schedule's
preconditioning says what it sees and what its output means (`NoiseSchedule.preconditioning`). Guidance and clamping are wrappers around a denoiser, so
samplers never know which network, condition or prediction target sits behind it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .schedule import NoiseSchedule

PREDICTIONS = ("eps", "v", "x0")
PRECONDITIONED = ("edm", "flow")  # predictions defined by their schedule's preconditioning
Cond = dict[str, torch.Tensor | None]
DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _expand(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    return sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


class Denoiser(nn.Module):
    """Wraps a network trained on the schedule's discrete timesteps."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction: str = "eps") -> None:
        super().__init__()
        if prediction not in PREDICTIONS + PRECONDITIONED:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if (prediction in PRECONDITIONED or schedule.kind in PRECONDITIONED) and (
            prediction != schedule.kind
        ):
            raise ValueError(f"a {prediction} prediction does not fit a {schedule.kind} schedule")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, cond: Cond | None = None
    ) -> torch.Tensor:
        sigma = _expand(sigma, x)
        if self.prediction in PRECONDITIONED:
            c_skip, c_out, c_in, c_noise = self.schedule.preconditioning(sigma)
            out = self.model(x * _per_sample(c_in, x), c_noise, **(cond or {})).to(x.dtype)
            return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * out
        t = self.schedule.sigma_to_t(sigma).to(device=x.device, dtype=torch.float32)
        s = _per_sample(sigma, x)
        c_in = 1 / (s**2 + 1).sqrt()
        out = self.model(x * c_in, t, **(cond or {})).to(x.dtype)
        if self.prediction == "eps":
            return x - s * out
        if self.prediction == "v":
            # x_vp = alpha x0 + sig eps, v = alpha eps - sig x0  =>  x0 = alpha x_vp - sig v
            return c_in**2 * x - s * c_in * out
        return out

    def prepare(self, cond: Cond | None) -> Cond | None:
        """`cond` with the network's condition-only work (a U-Net's keys, values, layout maps)
        done once, for all the calls of a sampling run; the same result as the raw `cond`."""
        prepare_cond = getattr(self.model, "prepare_cond", None)
        return cond if prepare_cond is None or cond is None else prepare_cond(cond)


def prepared(denoiser: Callable, cond: Cond | None) -> Cond | None:
    """`cond` prepared by `denoiser` when it is a `Denoiser` (see `Denoiser.prepare`)."""
    return denoiser.prepare(cond) if isinstance(denoiser, Denoiser) else cond


def training_target(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor
) -> torch.Tensor:
    """What the network learns to output for x_t = sqrt(abar) x0 + sqrt(1 - abar) noise."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        a = _per_sample(abar, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def cat_cond(a: Cond | None, b: Cond | None) -> Cond | None:
    """Stack two conditions along the batch (for one forward of both guidance branches)."""
    if a is None and b is None:
        return None
    a, b = a or {}, b or {}
    out: Cond = {}
    for key in a.keys() | b.keys():
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            if va is not None or vb is not None:
                raise ValueError(f"condition {key!r} is given for one guidance branch only")
            out[key] = None
        else:
            out[key] = torch.cat([va, vb])
    return out


def bind(denoiser: Callable, cond: Cond | None) -> DenoiserFn:
    """A two-argument denoiser with its condition fixed (and prepared once)."""
    cond = prepared(denoiser, cond)
    return lambda x, sigma: denoiser(x, sigma, cond)


GUIDANCE_RANGE = (1.0, 30.0)  # 1 is no guidance; the range AUTOMATIC1111's interface offers


def check_guidance(scale: float) -> None:
    """Refuse a guidance scale that is not a finite number in GUIDANCE_RANGE."""
    lo, hi = GUIDANCE_RANGE
    if not (isinstance(scale, (int, float)) and lo <= scale <= hi):  # NaN fails both
        raise ValueError(f"guidance must be a number from {lo:g} to {hi:g}, got {scale}")


def guided(
    denoiser: Callable,
    cond: Cond | None,
    uncond: Cond | None,
    scale: float | torch.Tensor,
    rescale: float = 0.0,
) -> DenoiserFn:
    """Classifier-free guidance, both branches in one batched forward. `scale` is a number,
    or a tensor of one scale per sample ([B, 1, 1, 1]).

    eps = eps_u + w (eps_c - eps_u); since x0 = x - sigma eps is affine in eps, guiding the x0
    estimates is the same thing. A negative prompt is simply the unconditional branch.
    `rescale` (Lin et al. 2023) pulls the guided eps back to the std of the conditional one.
    """
    if isinstance(scale, (int, float)) and scale == 1.0:
        return bind(denoiser, cond)
    both = prepared(denoiser, cat_cond(uncond, cond))

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = _expand(sigma, x)
        x0_u, x0_c = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        x0 = x0_u + scale * (x0_c - x0_u)
        if rescale > 0:
            s = _per_sample(sigma, x).clamp(min=1e-8)
            eps_c, eps = (x - x0_c) / s, (x - x0) / s
            dims = list(range(1, x.dim()))
            ratio = eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True)
            eps = rescale * eps * ratio + (1 - rescale) * eps
            x0 = x - s * eps
        return x0

    return fn


def consistency(denoiser: DenoiserFn, sigma_min: float, sigma_data: float = 0.5) -> DenoiserFn:
    """A consistency model's function (Song et al. 2023; LCM): f(x, sigma) = c_skip x +
    (1 - c_skip) D(x, sigma), with c_skip = 1 at sigma_min and falling fast above it, so that
    f is x itself at the trajectory's end whatever the network says (the boundary condition),
    and D, the teacher's x0 estimate when the student starts, almost everywhere else."""

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        u = (_per_sample(_expand(sigma, x), x) - sigma_min) / sigma_min
        c_skip = sigma_data**2 / (u**2 + sigma_data**2)
        return c_skip * x + (1 - c_skip) * denoiser(x, sigma)

    return fn


def clamped(denoiser: DenoiserFn, limit: float = 1.0, threshold: float | None = None) -> DenoiserFn:
    """Keep the x0 estimate in the data range [-limit, limit].

    `threshold` switches to Imagen's dynamic thresholding: per sample, s is that quantile of
    |x0| (at least `limit`), and x0 is clipped to [-s, s] then rescaled to [-limit, limit].
    """

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = denoiser(x, sigma)
        if threshold is None:
            return x0.clamp(-limit, limit)
        flat = x0.flatten(1).abs().float()
        s = torch.quantile(flat, threshold, dim=1).clamp(min=limit)
        s = _per_sample(s, x0)
        return x0.clamp(-s, s) / s * limit

    return fn
