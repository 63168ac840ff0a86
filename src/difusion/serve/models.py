"""A model as the server offers it: what it can make, a request checked against that, and
the generation itself with a preview of each step."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..checkpoints import CheckpointError, file_sha256
from ..denoiser import GUIDANCE_RANGE
from ..images import grid, to_pil
from ..model import SHIPPED, resolve_checkpoint, steps_kept
from ..pipeline import Pipeline, dtype_named, img2img_strength
from ..samplers import SAMPLERS
from .codec import centre_crop
from .errors import APIError
from .loras import applied

MAX_N = 8
MAX_STEPS = 1000
MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**63 - 1


@dataclass
class Generation:
    """One request in the project's own terms, whatever protocol it came by.

    `names` maps these fields to the protocol's own (e.g. guidance -> cfg_scale), so that a
    refusal names the field the client sent."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None  # None: the model's own
    guidance: float | None = None
    sampler: str | None = None
    spacing: str | None = None  # the sampler's sigmas, e.g. "karras"; None: the model's own
    seed: int | None = None  # None or -1: a random seed, reported back
    n: int = 1
    width: int | None = None
    height: int | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None  # white = redraw
    strength: float | None = None
    vary: Image.Image | None = None  # an unCLIP model's variations of this picture
    names: dict[str, str] | None = None
    loras: list[tuple[Path, float]] = field(default_factory=list)  # <lora:...> of the prompt

    def field(self, name: str) -> str:
        return (self.names or {}).get(name, name)


class GenerationOptions(BaseModel):
    """The JSON fields of a generation that the OpenAI and native routes share (strict: no
    "20" for 20, nor true for 1)."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="null: the model's own")
    guidance: float | None = Field(None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])
    sampler: str | None = Field(None, description="null: the model's own")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="-1 or null: random")
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, description='"WxH" (GET /api/info lists sizes) or "auto"')
    strength: float | None = Field(
        None, gt=0, le=1, description="img2img and inpainting only; default 0.8 and 1"
    )

    def generation(self, model: ServedModel, prompt: str, **images) -> Generation:
        width, height = parse_size(self.size, model)
        return Generation(
            prompt=prompt, negative_prompt=self.negative_prompt, steps=self.steps,
            guidance=self.guidance, sampler=self.sampler, seed=self.seed, n=self.n,
            width=width, height=height, strength=self.strength, **images,
        )  # fmt: skip


SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})", re.ASCII | re.IGNORECASE)


def parse_size(size: str | None, model: ServedModel) -> tuple[int | None, int | None]:
    """ "WxH" in ASCII digits -> (W, H); None, "" and "auto": the model's own. A side of 0 is
    refused here (`Pipeline.check_size` refuses what the model cannot make)."""
    if size in (None, "", "auto"):
        return None, None
    match = SIZE.fullmatch(size)
    if match is None or 0 in (w := int(match[1]), h := int(match[2])):
        shown = size if len(size) <= 40 else f"{size[:40]}..."
        raise APIError(422, f"{shown!r} is not WxH; {model.pipe.size_rule()}", "size")
    return w, h


class ServedModel:
    """A Pipeline loaded once, with the name clients choose it by."""

    def __init__(
        self, name: str, source: str, pipe: Pipeline, threads: int = 1,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:  # fmt: skip
        self.name, self.source, self.pipe, self.threads = name, source, pipe, threads
        self.max_steps = min(MAX_STEPS, pipe.model.schedule.num_steps)
        self._preview_map = fit_latent_preview(pipe) if pipe.vae is not None else None
        self.sha256 = checkpoint_sha256(source)
        self.executor = executor or self.new_executor()  # the threads that run it

    def new_executor(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.threads, thread_name_prefix=f"gen-{self.name}")

    @classmethod
    def load(
        cls, source: str, device: str = "cpu", threads: int = 1, dtype: torch.dtype | None = None
    ) -> ServedModel:
        """The model loaded on the thread that will run it: weights made on one thread and
        used on another ran 1.6x slower here (0.94 s against 0.58 s an image, 2-core CPU).
        `dtype`: the U-Net's weights (`Pipeline.from_pretrained`)."""
        path = Path(source)
        name = source if source in SHIPPED else (path.stem if path.is_file() else path.name)
        executor = ThreadPoolExecutor(threads, thread_name_prefix=f"gen-{name}")

        def build() -> ServedModel:
            pipe = Pipeline.from_pretrained(source, device, dtype)
            return cls(name, source, pipe, threads, executor)

        return executor.submit(build).result()

    # --- what it can make -----------------------------------------------------------------

    def info(self) -> dict:
        return {
            "name": self.name,
            "kind": self.pipe.kind,
            "sizes": self.pipe.sizes(),
            "default_size": self.pipe.sizes()[0],
            "default_steps": self.pipe.model.config.steps,
            "default_guidance": self.pipe.default_guidance,
            "guidance_range": list(self.pipe.model.guidance_range),
            "samplers": list(SAMPLERS),
            "default_sampler": self.pipe.model.config.sampler,
            "max_steps": self.max_steps,
            "max_n": MAX_N,
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_prompt_tokens": self.pipe.max_tokens,
            "takes_image": True,
            "classes": self.pipe.class_names,
        }

    # --- a request checked against it ------------------------------------------------------

    def check(self, g: Generation) -> Generation:
        """The request with its defaults filled in (size, guidance, seed), or a 422 that names
        the first field it cannot take."""

        def refuse(name: str, message: str):
            raise APIError(422, message, g.field(name))

        kind = self.pipe.kind
        if not isinstance(g.prompt, str) or len(g.prompt) > MAX_PROMPT_CHARS:
            refuse("prompt", f"must be a string of at most {MAX_PROMPT_CHARS} characters")
        if len(g.negative_prompt) > MAX_PROMPT_CHARS:
            refuse("negative_prompt", f"must be at most {MAX_PROMPT_CHARS} characters")
        prompt = g.prompt.strip() if kind != "unconditional" else ""  # nothing to condition on
        if kind == "text" and not prompt and g.vary is None:
            refuse("prompt", "must not be empty")
        if kind == "label":
            try:
                self.pipe.check_prompt(prompt)
            except ValueError as e:
                refuse("prompt", str(e))
        if kind != "text" and g.negative_prompt.strip():
            refuse("negative_prompt", "needs a text-to-image model")
        sampler = g.sampler or self.pipe.model.config.sampler
        steps = g.steps or self.pipe.model.config.steps
        if sampler not in SAMPLERS:
            refuse("sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= steps <= self.max_steps:
            refuse("steps", f"must be from 1 to {self.max_steps}, got {steps}")
        if not 1 <= g.n <= MAX_N:
            refuse("n", f"must be from 1 to {MAX_N}, got {g.n}")
        guidance = self.pipe.default_guidance if g.guidance is None else g.guidance
        lo, hi = self.pipe.model.guidance_range
        if not lo <= guidance <= hi:  # NaN and infinities fail too
            refuse("guidance", f"must be a number from {lo:g} to {hi:g}, got {guidance}")
        if kind == "unconditional" and guidance != 1.0:
            refuse("guidance", "must be 1: this model is unconditional")
        seed = g.seed
        if seed is None or seed == -1:
            seed = secrets.randbelow(2**31)
        elif not 0 <= seed <= MAX_SEED:
            refuse("seed", f"must be from 0 to {MAX_SEED} (or -1 for a random one), got {seed}")
        try:  # the one rule of sizes, memory included, that `difusion generate` uses too
            height, width = self.pipe.check_size(g.height, g.width, g.n)
        except ValueError as e:
            refuse("size", str(e))
        strength = g.strength
        if strength is not None:
            if g.image is None:
                refuse("strength", "needs an image (img2img or inpainting)")
            if not 0 < strength <= 1:
                refuse("strength", f"must be in (0, 1], got {strength}")
        if g.mask is not None:
            if g.image is None:
                refuse("mask", "needs the image to inpaint")
            if g.mask.size != g.image.size:
                mw, mh = g.mask.size
                iw, ih = g.image.size
                refuse("mask", f"is {mw}x{mh}, the image {iw}x{ih}: they must be the same size")
        if self.steps_run(replace(g, steps=steps)) < 1:
            refuse("strength", f"leaves no step of {steps} to run; raise it or the steps")
        return replace(
            g, prompt=prompt, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
            width=width, height=height,
        )  # fmt: skip

    @staticmethod
    def steps_run(g: Generation) -> int:
        """Steps the sampler runs: img2img skips the first 1 - strength of them."""
        if g.image is None:
            return g.steps
        return steps_kept(g.steps, img2img_strength(g.strength, inpainting=g.mask is not None))

    # --- generation (in a worker thread) ----------------------------------------------------

    def generate(self, g: Generation, on_step: Callable[[int, int, torch.Tensor], None]) -> list:
        """The checked request's images; `on_step(i, total, x0)` sees each step's x0 estimate
        (model space) and may raise to stop the run."""
        steps = self.steps_run(g)
        with applied(self.pipe, g.loras):  # the request's LoRAs, if any, for this job only
            if g.vary is not None:
                return self.pipe.variations(
                    g.vary.convert("RGB"), n=g.n, seed=g.seed, steps=g.steps,
                    guidance=g.guidance, sampler=g.sampler,
                    callback=lambda i, sigma, x0: on_step(i + 1, steps, x0),
                )  # fmt: skip
            x = self.pipe.sample(
                g.prompt,
                negative_prompt=g.negative_prompt,
                steps=g.steps,
                guidance=g.guidance,
                sampler=g.sampler,
                seed=g.seed,
                n=g.n,
                callback=lambda i, sigma, x0: on_step(i + 1, steps, x0),
                height=g.height,
                width=g.width,
                image=fit(g.image, g.width, g.height, "RGB"),
                mask_image=fit(g.mask, g.width, g.height, "L"),
                spacing=g.spacing,
                strength=g.strength,
            )
        return to_pil(x)

    def finish(self, x0: torch.Tensor) -> list[Image.Image]:
        """A step's x0 estimate decoded: an interrupted job's images, as far as it got."""
        with torch.inference_mode():
            return to_pil(self.pipe.decode(x0).float().clamp(-1, 1))

    def preview(self, x0: torch.Tensor) -> Image.Image:
        """A step's x0 estimate as one small picture: the batch side by side, latents through
        a linear map to RGB fitted to the VAE (as AUTOMATIC1111's cheap approximation)."""
        x0 = x0.detach().float().cpu()
        if self._preview_map is not None:
            w, b = self._preview_map
            x0 = torch.einsum("nchw,cd->ndhw", x0, w) + b.view(1, -1, 1, 1)
        return grid(to_pil(x0.clamp(-1, 1)), cols=len(x0), pad=0)


def fit(image: Image.Image | None, width: int, height: int, mode: str) -> Image.Image | None:
    """An upload's centred part of the size's aspect ratio, in `mode` (the pipeline scales
    it to the size)."""
    return None if image is None else centre_crop(image, width, height).convert(mode)


@torch.no_grad()
def fit_latent_preview(
    pipe: Pipeline, n: int = 4, size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares map from a latent pixel to the mean colour (or grey) of the image pixels
    it decodes to, fitted on a few random latents: latent previews without running the decoder."""
    channels, f = pipe.model.config.channels, pipe.downscale
    z = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))
    image = F.avg_pool2d(pipe.decode(z.to(pipe.model.device)).float().cpu(), f)
    a = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(n * size * size, 1)], 1)
    b = image.permute(0, 2, 3, 1).reshape(-1, image.shape[1])  # RGB, or grey
    solution = torch.linalg.lstsq(a, b).solution
    return solution[:-1], solution[-1]


def checkpoint_sha256(source: str) -> str | None:
    """The sha256 of one of the project's model files (not hashed: Stable Diffusion's GBs)."""
    try:
        path = resolve_checkpoint(source)
    except CheckpointError:
        return None
    return file_sha256(path) if path.stat().st_size < 2**28 else None


def load_models(
    sources: list[str], device: str = "cpu", concurrency: int = 1, dtype: str = "fp32"
) -> dict[str, ServedModel]:
    """Each model loaded once, by the name clients will use; a clear error for a bad one.
    `dtype`: "fp32" or "bf16", the U-Nets' weights."""
    weights = dtype_named(dtype)
    models: dict[str, ServedModel] = {}
    for source in sources:
        try:
            model = ServedModel.load(source, device, concurrency, weights)
        except (CheckpointError, ValueError, FileNotFoundError) as e:
            raise CheckpointError(
                str(e) if source in str(e) else f"--model {source}: {e}"
            ) from None
        if model.name in models:
            model.name = f"{model.name}-{len(models)}"
        models[model.name] = model
    return models
