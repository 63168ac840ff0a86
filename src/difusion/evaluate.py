"""Measure a trained model: sample quality and diversity, or prompt alignment on `shapes`."""

from __future__ import annotations

import time
from collections import Counter

import torch

from .data import load_dataset
from .model import DiffusionModel


@torch.no_grad()
def draw(
    model: DiffusionModel,
    n: int,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance: float = 1.0,
    batch_size: int = 250,
) -> torch.Tensor:
    """n images in [-1, 1] from a diffusion model or a GAN (one pass, sampler ignored);
    class-conditional models draw every class in turn, latent models are decoded by their VAE."""
    from .nn.gan import GAN

    if isinstance(model, GAN):
        return model.sample(n, seed=seed, batch_size=batch_size).cpu()
    vae = None
    if model.config.latent is not None:
        from .vae_train import vae_for

        vae = vae_for(model.config.latent, model.device)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        cond = uncond = None
        if model.config.cond == "label":
            k = model.config.null_label
            cond, uncond = model.label_cond([(start + i) % k for i in range(b)])
        elif model.config.cond == "text":
            raise ValueError("text models are measured with --alignment (shapes) or a prompt set")
        x = model.sample(
            b,
            sampler=sampler,
            steps=steps,
            seed=seed + start,
            cond=cond,
            uncond=uncond,
            guidance=guidance,
        )
        if vae is not None:
            x = vae.decode_latents(x).clamp(-1, 1)
        out.append(x.cpu())
    return torch.cat(out)


def image_shape(model: DiffusionModel) -> tuple[int, int]:
    """(size, channels) of the images a model draws: a latent model's are its VAE's decodes."""
    from .nn.gan import GAN

    if isinstance(model, GAN) or model.config.latent is None:
        return model.config.image_size, model.config.channels
    from .nn.vae import VAEConfig

    vae = VAEConfig(**model.config.latent["vae"])
    return model.config.image_size * vae.downscale, vae.out_channels


def real_images(data: str, n: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    dataset = load_dataset(data, size)
    if dataset.channels != channels:
        raise ValueError(
            f"{data!r} has {dataset.channels}-channel images; the model makes {channels}"
        )
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([dataset[int(i)]["image"] for i in idx])


def evaluate(
    model: DiffusionModel,
    data: str,
    n: int,
    feature_net: str,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance: float = 1.0,
) -> dict:
    """FID, KID, precision/recall (and mode coverage with a classifier) of n samples of a
    diffusion model or a GAN."""
    from .metrics import compute_metrics, load_feature_net

    net = load_feature_net(feature_net)
    start = time.monotonic()
    fake = draw(model, n, sampler=sampler, steps=steps, seed=seed, guidance=guidance)
    seconds = time.monotonic() - start
    real = real_images(data, n, *image_shape(model), seed)
    result = compute_metrics(real, fake, net)
    from .nn.gan import GAN

    if isinstance(model, GAN):
        sampler, steps = "gan (one pass)", 1
    else:
        sampler, steps = sampler or model.config.sampler, steps or model.config.steps
    result.update({"sampler": sampler, "steps": steps, "images_per_s": n / seconds, "data": data})
    return result


def evaluate_alignment(
    model: DiffusionModel,
    n_single: int = 200,
    n_double: int = 200,
    seeds: tuple[int, ...] = (0,),
    *,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 200,
    wording: str | None = None,
    language: str = "en",
    clip=None,
) -> dict:
    """Fraction of canonical shapes prompts the model satisfies, by the strict scorer.

    `clip` (a `Clip`): also each image's CLIP score (cosine of prompt and image embeddings)
    beside the scorer's verdict, and how well the score separates passes from failures.

    `language` "es": the same prompts in Spanish ("un círculo rojo encima de ...").

    `wording` ("colour", "shape" or "relation", see `alignment.UNSEEN_WORDINGS`): the model is
    prompted with that part of each prompt in words no training caption holds, and scored
    against the canonical prompt; None or "canonical" prompts with the canonical words."""
    from .alignment import check_wording, prompt_set, reword, score_batch
    from .clip_eval import clip_score_summary, clip_scores

    wording = wording or "canonical"
    check_wording(wording)  # before any sampling
    if language not in ("en", "es"):
        raise ValueError(f"language must be en or es, got {language!r}")
    if language == "es" and wording != "canonical":
        raise ValueError("the unseen wordings are English: use them with language en")

    if model.config.cond != "text":
        raise ValueError("--alignment needs a text-conditioned model")
    guidance = model.config.guidance if guidance is None else guidance
    sampler, steps = sampler or model.config.sampler, steps or model.config.steps
    totals = {"single": [0, 0], "double": [0, 0]}
    sampling = 0.0
    failures: Counter[str] = Counter()
    clip_rows: list[tuple[torch.Tensor, list[bool]]] = []
    for seed in seeds:
        prompts = prompt_set(n_single, n_double, seed=seed, language=language)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            asked = [reword(p, wording) for p in chunk]
            cond, uncond = model.text_cond(asked), model.text_cond([""] * len(chunk))
            start_time = time.monotonic()
            x = model.sample(
                len(chunk), sampler=sampler, steps=steps, seed=seed * 100_003 + start,
                cond=cond, uncond=uncond, guidance=guidance,
            )  # fmt: skip
            sampling += time.monotonic() - start_time
            scores = score_batch(x, chunk)
            totals["single"][0] += scores["passed_single"]
            totals["single"][1] += scores["n_single"]
            totals["double"][0] += scores["passed_double"]
            totals["double"][1] += scores["n_double"]
            failures.update(scores["reasons"])
            if clip is not None:
                passed = [v.passed for v in scores["verdicts"]]
                clip_rows.append((clip_scores(clip, x, asked), passed))
    single, double = totals["single"], totals["double"]
    result = {
        "alignment_single": single[0] / max(1, single[1]),
        "alignment_double": double[0] / max(1, double[1]),
        "n_single": single[1],
        "n_double": double[1],
        "seeds": list(seeds),
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "wording": wording,
        "language": language,
        "images_per_s": (single[1] + double[1]) / max(sampling, 1e-9),
        "failures": dict(failures.most_common()),  # reasons by category; an image may give several
    }
    if clip is not None:
        result.update(clip_score_summary(clip_rows))
    return result


def format_table(result: dict) -> str:
    rows = []
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
        elif isinstance(value, list) and len(value) > 12:
            value = f"[{len(value)} values]"
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
