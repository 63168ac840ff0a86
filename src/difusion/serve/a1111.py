"""AUTOMATIC1111's web UI API (/sdapi/v1), the fields its clients send (the `webuiapi`
package, chat front ends such as Open WebUI); fields that change nothing here are accepted
and ignored, as the web UI ignores those of extensions it does not have."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..denoiser import GUIDANCE_RANGE
from . import a1111_samplers
from .body import CheckedRoute
from .codec import b64, base64_images, encode_all
from .errors import APIError
from .models import MAX_N, MAX_SEED, MAX_STEPS, Generation, ServedModel
from .server import in_pool, run_generation, server

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"], route_class=CheckedRoute)
# the size fields' protocol names, for refusals
NAMES = {"guidance": "cfg_scale", "n": "batch_size", "sampler": "sampler_name",
         "size": "width", "strength": "denoising_strength", "image": "init_images"}  # fmt: skip


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1])
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of sampler_name
    scheduler: str | None = None  # 1.9 on: "Karras", ...
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1, le=MAX_N)
    n_iter: int = Field(1, ge=1, le=MAX_N)
    enable_hr: bool = False
    override_settings: dict | None = None
    send_images: bool = True


class Img2Img(Txt2Img):
    init_images: list[str] = []
    mask: str | None = None
    denoising_strength: float = Field(0.75, gt=0, le=1)
    inpainting_mask_invert: int = 0


class ImagesResult(BaseModel):
    images: list[str]
    parameters: dict
    info: str


def model_of(body: Txt2Img, request: Request) -> ServedModel:
    s = server(request)
    name = (body.override_settings or {}).get("sd_model_checkpoint") or s.options[
        "sd_model_checkpoint"
    ]
    return s.model(name, "override_settings.sd_model_checkpoint")


def generation(body: Txt2Img) -> tuple[Generation, str | None]:
    """The request in the project's terms, and a note on the sampler that runs for the
    client's name (None where it is the same)."""
    if body.enable_hr:
        raise APIError(
            422, "the hires fix is not supported; ask for the size directly", "enable_hr"
        )
    field = "sampler_name" if body.sampler_name else "sampler_index"
    sampler, spacing, note = a1111_samplers.resolve(
        body.sampler_name or body.sampler_index, body.scheduler, field
    )
    names = dict(NAMES, n="batch_size" if body.n_iter == 1 else "batch_size * n_iter")
    g = Generation(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
        guidance=body.cfg_scale, sampler=sampler, spacing=spacing, seed=body.seed,
        n=body.batch_size * body.n_iter, width=body.width, height=body.height, names=names,
    )  # fmt: skip
    return g, note


async def result(
    request: Request, model: ServedModel, g: Generation, note: str | None, body: Txt2Img
) -> dict:
    """The images (as far as they got when /interrupt stopped them, as the web UI does) with
    the web UI's info; `sampler_used` says what ran for the client's sampler name."""
    images, g, job = await run_generation(request, model, g, partial_ok=True)
    sampler = body.sampler_name or body.sampler_index or g.sampler
    info = {
        "prompt": g.prompt, "all_prompts": [g.prompt] * len(images),
        "negative_prompt": g.negative_prompt, "seed": g.seed, "all_seeds": [g.seed] * len(images),
        "width": g.width, "height": g.height, "sampler_name": sampler,
        "sampler_used": note or g.sampler, "scheduler": body.scheduler,
        "cfg_scale": g.guidance, "steps": g.steps, "batch_size": len(images),
        "sd_model_name": model.name, "sd_model_hash": (model.sha256 or "")[:10] or None,
        "infotexts": [infotext(g, model, i, sampler) for i in range(len(images))],
    }  # fmt: skip
    if job.stop_reason == "interrupted":
        info.update(interrupted=True, steps_done=job.step)
    sent = [b64(b) for b in await in_pool(request, encode_all, images)] if body.send_images else []
    return {"images": sent, "parameters": body.model_dump(), "info": json.dumps(info)}


def infotext(g: Generation, model: ServedModel, index: int, sampler: str) -> str:
    """The web UI's parameters line, as it writes it under each image."""
    lines = [g.prompt]
    if g.negative_prompt:
        lines.append(f"Negative prompt: {g.negative_prompt}")
    lines.append(
        f"Steps: {g.steps}, Sampler: {sampler}, CFG scale: {g.guidance}, Seed: {g.seed}, "
        f"Size: {g.width}x{g.height}, Model: {model.name}, Batch pos: {index}"
    )
    return "\n".join(lines)


@router.post("/txt2img", response_model=ImagesResult)
async def txt2img(body: Txt2Img, request: Request) -> dict:
    model = model_of(body, request)
    return await result(request, model, *generation(body), body)


@router.post("/img2img", response_model=ImagesResult)
async def img2img(body: Img2Img, request: Request) -> dict:
    """img2img from init_images[0], inpainting where `mask` is white (black with
    inpainting_mask_invert=1)."""
    model = model_of(body, request)
    if len(body.init_images) != 1:
        raise APIError(422, f"give one image to start from, got {len(body.init_images)}",
                       "init_images")  # fmt: skip
    g, note = generation(body)
    g.image, g.mask = await in_pool(
        request, base64_images, body.init_images[0], body.mask, "init_images", "mask",
        bool(body.inpainting_mask_invert),
    )  # fmt: skip
    g.strength = body.denoising_strength
    return await result(request, model, g, note, body)


@router.get("/sd-models")
def sd_models(request: Request) -> list[dict]:
    return [
        {
            "title": m.name,
            "model_name": m.name,
            "hash": (m.sha256 or "")[:10] or None,
            "sha256": m.sha256,
            "filename": m.source,
            "config": None,
        }  # fmt: skip
        for m in server(request).models.values()
    ]


@router.get("/samplers")
def samplers() -> list[dict]:
    """Every name AUTOMATIC1111 has listed, with the sampler of this project it runs."""
    return a1111_samplers.listing()


@router.get("/schedulers")
def schedulers() -> list[dict]:
    return a1111_samplers.scheduler_listing()


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False) -> dict:
    s = server(request)
    current = s.workers[s.options["sd_model_checkpoint"]]
    busy = next((w for w in s.workers.values() if w.running), current)
    out = busy.progress()
    if skip_current_image:
        out["current_image"] = None
    return out


@router.post("/interrupt")
def interrupt(request: Request) -> dict:
    """Stops the running generations: AUTOMATIC1111's requests answer with the images as far
    as they got, the OpenAI ones 409, the stream an error event."""
    for worker in server(request).workers.values():
        for job in worker.running:
            job.stop("interrupted")
    return {}


@router.get("/options")
def get_options(request: Request) -> dict:
    s = server(request)
    model = s.models[s.options["sd_model_checkpoint"]]
    return {**s.options, "sd_checkpoint_hash": model.sha256}


def short_text(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 200


def whole(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


# the options kept and read back (checked; the others are ignored, as the web UI ignores
# those it does not know): what clients set, though only the model changes anything here
OPTIONS = {
    "samples_format": lambda v: v in ("png", "jpg", "jpeg", "webp"),
    "sd_vae": short_text,
    "CLIP_stop_at_last_layers": whole(1, 12),
    "eta_noise_seed_delta": whole(0, 2**32),
    "live_previews_enable": lambda v: isinstance(v, bool),
    "show_progress_every_n_steps": whole(-1, 1000),
}


@router.post("/options")
def set_options(options: dict, request: Request) -> None:
    """Chat front ends choose the model here (`sd_model_checkpoint`: a title from
    /sdapi/v1/sd-models); a few other options are kept and read back, each checked."""
    s = server(request)
    kept = {}
    for name, value in options.items():
        if name == "sd_model_checkpoint":
            kept[name] = s.model(value, "sd_model_checkpoint").name
        elif name in OPTIONS and not OPTIONS[name](value):
            raise APIError(422, "not a value this option takes", name)
        elif name in OPTIONS:
            kept[name] = value
    s.options.update(kept)


@router.get("/scripts")
def scripts() -> dict:
    return {"txt2img": [], "img2img": []}
