"""unCLIP's prior: a diffusion model over CLIP image embeddings, conditioned on the prompt.

A small transformer reads [text tokens, text embedding, timestep, noisy image embedding,
query] and predicts the clean image embedding at the query (Ramesh et al. 2022, section 2.2:
x0 prediction, classifier-free guidance by dropping the text). The embedding is a vector
[B, D], not an image: the samplers and the guidance wrapper of the image models work on it
unchanged through the same denoiser. Embeddings are unit vectors; the model works on them
scaled by sqrt(D), so that each value has about unit variance like an image's pixels, and its
x0 estimates are put back on that sphere at every step.

Saved as one safetensors file, the PriorConfig as JSON in its metadata ("difusion-prior/1").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import CheckpointError, atomic_save, read_safetensors
from .configs import DictConfig
from .denoiser import Cond, Denoiser, DenoiserFn, bind, check_guidance, guided
from .errors import first_line
from .nn.unet import timestep_embedding
from .samplers import Callback, get_sampler, initial_noise
from .schedule import NoiseSchedule, ScheduleConfig

FORMAT = "difusion-prior/1"


@dataclass
class PriorConfig(DictConfig):
    embed_dim: int = 128  # CLIP's embedding size D
    text_width: int = 192  # the width of CLIP's per-token text states
    context_length: int = 32  # CLIP's text window, the tokens the prior reads
    width: int = 256
    layers: int = 4
    heads: int = 4
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: str = "ddim"  # how a pipeline samples it by default
    steps: int = 25
    guidance: float = 2.0
    clip: dict | None = None  # the CLIP it was trained on: embed_dim, sha256


class PriorTransformer(nn.Module):
    """x0 of the (scaled) image embedding from its noisy version, the timestep and the text."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_proj = nn.Linear(c.text_width, c.width)
        self.text_embed_proj = nn.Linear(c.embed_dim, c.width)
        self.time_mlp = nn.Sequential(
            nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width)
        )
        self.x_proj = nn.Linear(c.embed_dim, c.width)
        self.query = nn.Parameter(torch.randn(c.width) * 0.02)
        self.position = nn.Parameter(torch.randn(c.context_length + 4, c.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            c.width, c.heads, 4 * c.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, c.embed_dim)

    def forward(
        self, x: Tensor, t: Tensor, text_embed: Tensor, tokens: Tensor, token_mask: Tensor
    ) -> Tensor:
        """x [B, D] noisy, t [B], text_embed [B, D], tokens [B, L, W], token_mask [B, L] (True
        = a real token) -> x0 estimate [B, D]."""
        B, L, _ = tokens.shape
        t = torch.as_tensor(t, device=x.device).expand(B)
        time = self.time_mlp(timestep_embedding(t, self.config.width))
        seq = torch.cat(
            [
                self.token_proj(tokens),
                self.text_embed_proj(text_embed)[:, None],
                time[:, None],
                self.x_proj(x)[:, None],
                self.query.expand(B, 1, -1),
            ],
            dim=1,
        )
        seq = seq + self.position[: L + 4]
        keep = torch.cat([token_mask.bool(), token_mask.new_ones(B, 4, dtype=torch.bool)], dim=1)
        h = self.transformer(seq, src_key_padding_mask=~keep)
        return self.out(self.norm_out(h[:, -1]))


def on_sphere(denoiser: DenoiserFn, radius: float) -> DenoiserFn:
    """The x0 estimate put on the sphere the (scaled) embeddings lie on: the prior's
    counterpart of clamping pixels to [-1, 1]."""
    return lambda x, sigma: F.normalize(denoiser(x, sigma), dim=-1) * radius


class Prior(nn.Module):
    """The prior's network, its schedule and sampling, in unit CLIP embeddings."""

    def __init__(self, config: PriorConfig, net: PriorTransformer | None = None) -> None:
        super().__init__()
        self.config = config
        self.net = net if net is not None else PriorTransformer(config)
        self.schedule = NoiseSchedule(config.schedule)

    @property
    def scale(self) -> float:
        """Unit embeddings times this have about unit variance per value."""
        return math.sqrt(self.config.embed_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.schedule, "x0")

    def loss(self, embeds: Tensor, cond: Cond, generator: torch.Generator) -> Tensor:
        """MSE of the x0 estimate of unit image embeddings `embeds` [B, D], noised at random
        timesteps."""
        x0 = embeds * self.scale
        g = generator
        t = torch.randint(0, self.schedule.num_steps, (len(x0),), generator=g, device=g.device)
        noise = torch.randn(x0.shape, generator=g, device=g.device).to(x0.device)
        t = t.to(x0.device)
        out = self.net(self.schedule.q_sample(x0, t, noise), t.float(), **cond)
        return F.mse_loss(out, x0)

    def guided_denoiser(
        self, cond: Cond, uncond: Cond | None = None, guidance: float = 1.0
    ) -> DenoiserFn:
        check_guidance(guidance)
        if uncond is not None and guidance != 1.0:
            fn = guided(self.denoiser(), cond, uncond, guidance)
        else:
            fn = bind(self.denoiser(), cond)
        return on_sphere(fn, self.scale)

    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        uncond: Cond | None = None,
        *,
        guidance: float | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        callback: Callback | None = None,
    ) -> Tensor:
        """Unit image embeddings [B, D], one for each row of `cond` (see `text_cond`)."""
        cfg = self.config
        guidance = cfg.guidance if guidance is None else guidance
        fn = self.guided_denoiser(cond, uncond, guidance)
        sigmas = self.schedule.sample_sigmas(steps or cfg.steps).to(self.device)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        n = len(cond["text_embed"])
        x = initial_noise((n, cfg.embed_dim), float(sigmas[0]), generator, self.device)
        x = get_sampler(sampler or cfg.sampler)(
            fn, x, sigmas, callback=callback, generator=generator
        )
        return F.normalize(x, dim=-1)

    def save(self, path: str | Path, extra_metadata: dict | None = None) -> None:
        metadata = {"format": FORMAT, "config": json.dumps(self.config.to_dict())}
        metadata.update(extra_metadata or {})
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.net.state_dict().items()}
        atomic_save(state, path, metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Prior:
        path = Path(path)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path}: no such prior (give a prior run folder or its file)")
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an unCLIP prior (format {FORMAT})")
        try:
            prior = cls(PriorConfig.from_dict(json.loads(metadata["config"])))
            prior.net.load_state_dict(tensors)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: the prior does not load ({first_line(e)})") from None
        return prior.to(device).eval()


@torch.no_grad()
def text_cond(clip: nn.Module, prompts: list[str]) -> Cond:
    """The prior's condition of prompts: CLIP's text embedding and its per-token states,
    padded to CLIP's whole window (so that two branches of guidance stack)."""
    embeds, states, mask = clip.text_states(list(prompts))
    pad = clip.config.context_length - states.shape[1]
    return {
        "text_embed": embeds,
        "tokens": F.pad(states, (0, 0, 0, pad)),
        "token_mask": F.pad(mask, (0, pad), value=False),
    }
