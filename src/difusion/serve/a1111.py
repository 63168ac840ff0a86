"""AUTOMATIC1111's web UI API (/sdapi/v1), the fields its clients send (the `webuiapi`
package, chat front ends such as Open WebUI); fields that change nothing here are accepted
and ignored, as the web UI ignores those of extensions it does not have."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..denoiser import GUIDANCE_RANGE
from .codec import b64, encode, open_base64_image
from .errors import APIError
from .models import MAX_N, MAX_SEED, MAX_STEPS, Generation, ServedModel
from .server import run_generation, server

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

# the web UI's sampler names -> ours (ours are accepted as they are too)
SAMPLER_NAMES = {
    "DPM++ 2M": "dpmpp_2m",
    "Euler a": "euler_ancestral",
    "Euler": "euler",
    "Heun": "heun",
    "DDIM": "ddim",
    "DDPM": "ddpm",
    "LCM": "lcm",
}
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


def sampler_of(body: Txt2Img) -> str | None:
    name = body.sampler_name or body.sampler_index
    return SAMPLER_NAMES.get(name, name) if name else None


def model_of(body: Txt2Img, request: Request) -> ServedModel:
    s = server(request)
    name = (body.override_settings or {}).get("sd_model_checkpoint") or s.options[
        "sd_model_checkpoint"
    ]
    return s.model(name, "override_settings.sd_model_checkpoint")


def generation(body: Txt2Img) -> Generation:
    if body.enable_hr:
        raise APIError(
            422, "the hires fix is not supported; ask for the size directly", "enable_hr"
        )
    if body.n_iter < 1:
        raise APIError(422, f"must be at least 1, got {body.n_iter}", "n_iter")
    names = dict(NAMES, n="batch_size" if body.n_iter == 1 else "batch_size * n_iter")
    return Generation(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
        guidance=body.cfg_scale, sampler=sampler_of(body), seed=body.seed,
        n=body.batch_size * body.n_iter, width=body.width, height=body.height, names=names,
    )  # fmt: skip


async def result(request: Request, model: ServedModel, g: Generation, body: Txt2Img) -> dict:
    images, g, _ = await run_generation(request, model, g)
    info = {
        "prompt": g.prompt, "all_prompts": [g.prompt] * len(images),
        "negative_prompt": g.negative_prompt, "seed": g.seed, "all_seeds": [g.seed] * len(images),
        "width": g.width, "height": g.height, "sampler_name": body.sampler_name or g.sampler,
        "cfg_scale": g.guidance, "steps": g.steps, "batch_size": len(images),
        "sd_model_name": model.name, "sd_model_hash": (model.sha256 or "")[:10] or None,
        "infotexts": [infotext(g, model, i) for i in range(len(images))],
    }  # fmt: skip
    sent = [b64(encode(im)) for im in images] if body.send_images else []
    return {"images": sent, "parameters": body.model_dump(), "info": json.dumps(info)}


def infotext(g: Generation, model: ServedModel, index: int) -> str:
    """The web UI's parameters line, as it writes it under each image."""
    lines = [g.prompt]
    if g.negative_prompt:
        lines.append(f"Negative prompt: {g.negative_prompt}")
    lines.append(
        f"Steps: {g.steps}, Sampler: {g.sampler}, CFG scale: {g.guidance}, Seed: {g.seed}, "
        f"Size: {g.width}x{g.height}, Model: {model.name}, Batch pos: {index}"
    )
    return "\n".join(lines)


@router.post("/txt2img", response_model=ImagesResult)
async def txt2img(body: Txt2Img, request: Request) -> dict:
    model = model_of(body, request)
    return await result(request, model, generation(body), body)


@router.post("/img2img", response_model=ImagesResult)
async def img2img(body: Img2Img, request: Request) -> dict:
    """img2img from init_images[0], inpainting where `mask` is white (black with
    inpainting_mask_invert=1)."""
    model = model_of(body, request)
    if not body.init_images:
        raise APIError(422, "give one image to start from", "init_images")
    image = open_base64_image(body.init_images[0], "init_images")
    mask = None
    if body.mask:
        mask = open_base64_image(body.mask, "mask").convert("L")
        if body.inpainting_mask_invert:
            mask = mask.point(lambda v: 255 - v)
    g = generation(body)
    g.image, g.mask, g.strength = image, mask, body.denoising_strength
    return await result(request, model, g, body)


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
    ours = {v: k for k, v in SAMPLER_NAMES.items()}
    from ..samplers import SAMPLERS

    return [{"name": ours.get(s, s), "aliases": [s], "options": {}} for s in SAMPLERS]


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
    """Stops the running generations (their requests answer 409)."""
    for worker in server(request).workers.values():
        for job in worker.running:
            job.stop("interrupted")
    return {}


@router.get("/options")
def get_options(request: Request) -> dict:
    s = server(request)
    model = s.models[s.options["sd_model_checkpoint"]]
    return {**s.options, "sd_checkpoint_hash": model.sha256}


@router.post("/options")
def set_options(options: dict, request: Request) -> None:
    """Chat front ends choose the model here (`sd_model_checkpoint`: a title from
    /sdapi/v1/sd-models); other options are kept and read back."""
    s = server(request)
    if "sd_model_checkpoint" in options:
        name = options["sd_model_checkpoint"]
        if not isinstance(name, str):
            raise APIError(422, "must be a model title", "sd_model_checkpoint")
        options["sd_model_checkpoint"] = s.model(name, "sd_model_checkpoint").name
    s.options.update(options)


@router.get("/scripts")
def scripts() -> dict:
    return {"txt2img": [], "img2img": []}
