"""The diffusion objective of a training batch: DDPM's simple loss (eps, v or x0 targets,
optionally min-SNR weighted), EDM's preconditioned loss or flow matching's (`edm_flow_loss`),
and the condition with classifier-free dropout, from the random
choices (`Draws`) of the step the batch belongs to."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .denoiser import PRECONDITIONED, Cond, training_target
from .model import DiffusionModel
from .schedule import NoiseSchedule


def diffusion_loss(
    model: torch.nn.Module,
    diffusion: DiffusionModel,
    x0: torch.Tensor,
    cond: Cond | None,
    generator: torch.Generator,
    min_snr_gamma: float = 0.0,
    draws: Draws | None = None,
) -> torch.Tensor:
    """The simple loss of DDPM, optionally min-SNR weighted. `model` may be a DDP wrapper.
    t and the noise are `draws`' (this batch's share of its step's), or drawn by `generator`."""
    schedule, prediction = diffusion.schedule, diffusion.config.prediction
    if draws is None:
        draws = Draws.make(diffusion, x0, 1, generator, None)
    if prediction in PRECONDITIONED:
        return edm_flow_loss(model, schedule, x0, cond, draws)
    t, noise = draws.t.to(x0.device), draws.noise.to(x0.device)
    abar = schedule.alphas_cumprod.to(x0.device)[t].float()
    x_t = schedule.q_sample(x0, t, noise)
    target = training_target(prediction, x0, noise, abar)
    out = model(x_t, t.float(), **(cond or {}))
    per_sample = F.mse_loss(out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = abar / (1 - abar).clamp(min=1e-8)
        clipped = snr.clamp(max=min_snr_gamma)
        weight = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]
        per_sample = per_sample * weight
    return per_sample.mean()


def edm_flow_loss(
    model: torch.nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, cond: Cond | None,
    draws: Draws,
) -> torch.Tensor:  # fmt: skip
    """EDM's loss, lambda(sigma) |D(x0 + sigma eps, sigma) - x0|^2 with lambda = 1 / c_out^2,
    is the plain regression of F on (x0 - c_skip x) / c_out; for flow matching that target is
    eps - x0, unweighted. The noise levels are the draws' sigmas (`training_sigmas`)."""
    sigma, noise = draws.t.to(x0.device), draws.noise.to(x0.device)
    c_skip, c_out, c_in, c_noise = (
        c.view(-1, *([1] * (x0.dim() - 1))) for c in schedule.preconditioning(sigma)
    )
    if schedule.kind == "flow":  # the same numbers, without cancelling a large sigma
        t = -c_out
        net_in, target = (1 - t) * x0 + t * noise, noise - x0
    else:
        x = x0 + sigma.view_as(c_out) * noise
        net_in, target = c_in * x, (x0 - c_skip * x) / c_out
    out = model(net_in.to(x0.dtype), c_noise.flatten(), **(cond or {}))
    return F.mse_loss(out.float(), target.float())


@dataclass
class Draws:
    """The random choices of a training step for all its batches (every process's, every
    accumulated one's): timesteps (for edm and flow: sigmas), noise and which conditions are
    dropped. Each batch takes
    its share, so a step draws the same whatever the number of processes or accumulated
    batches it is split into (all of them draw alike; the generators are the same in each)."""

    t: torch.Tensor
    noise: torch.Tensor
    dropped: torch.Tensor | None  # on the host

    @classmethod
    def make(
        cls,
        diffusion: DiffusionModel,
        x0: torch.Tensor,
        parts: int,
        generator: torch.Generator,
        cond_generator: torch.Generator | None,
        drop: float = 0.0,
    ) -> Draws:
        """Draws for `parts` batches shaped like `x0`."""
        n, g, schedule = x0.shape[0] * parts, generator, diffusion.schedule
        if schedule.kind in PRECONDITIONED:
            t = schedule.training_sigmas(n, g)
        else:
            t = torch.randint(0, schedule.num_steps, (n,), generator=g, device=g.device)
        noise = torch.randn((n, *x0.shape[1:]), generator=g, device=g.device, dtype=x0.dtype)
        dropped = None
        if cond_generator is not None:
            dropped = torch.rand(n, generator=cond_generator, device=cond_generator.device) < drop
        return cls(t, noise, dropped)

    def share(self, part: int, b: int) -> Draws:
        rows = slice(part * b, (part + 1) * b)
        dropped = None if self.dropped is None else self.dropped[rows]
        return Draws(self.t[rows], self.noise[rows], dropped)


def batch_cond(
    batch: dict,
    diffusion: DiffusionModel,
    drop: float,
    generator: torch.Generator,
    device: torch.device,
    dropped: torch.Tensor | None = None,
) -> Cond | None:
    """The batch's condition, dropped (to the null label, the empty prompt or a zero image
    embedding) where `dropped` says, or else with probability `drop`."""
    kind = diffusion.config.cond
    if kind is None:
        return None
    n = len(batch["image"])
    if dropped is None:
        dropped = (torch.rand(n, generator=generator, device=generator.device) < drop).cpu()
    if kind == "image":  # unCLIP's decoder: the image's own CLIP embedding, zero when dropped
        embeds = diffusion.embed_images(batch["image"].to(device))
        return {"image_embed": embeds.masked_fill(dropped.to(device)[:, None], 0.0)}
    if kind == "text":
        captions = ["" if d else c for c, d in zip(batch["caption"], dropped.tolist(), strict=True)]
        return diffusion.text_cond(captions)
    labels = batch["label"].clone()
    labels[dropped] = diffusion.config.null_label
    return {"class_labels": labels.to(device)}
