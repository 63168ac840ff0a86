"""OpenAI's images API: generations, edits and the model list, as the official client
sends them. Extensions ride in the same body (the client's `extra_body`): negative_prompt,
steps, guidance, sampler, seed, strength."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from .body import CheckedRoute
from .codec import MAX_UPLOAD_BYTES, b64, edit_images, encode_all
from .errors import APIError
from .models import Generation, GenerationOptions, ServedModel
from .server import in_pool, public_url, run_generation, server

router = APIRouter(prefix="/v1", tags=["openai"], route_class=CheckedRoute)
Format = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["b64_json", "url"]


class ImageGenerationRequest(GenerationOptions):
    model_config = ConfigDict(extra="ignore")  # quality, style, user... mean nothing here

    prompt: str
    response_format: ResponseFormat = "b64_json"
    output_format: Format = "png"


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Format = "png"
    size: str | None = None


async def respond(
    request: Request, model: ServedModel, g: Generation, response_format: str, fmt: str
) -> ImagesResponse:
    images, g, _ = await run_generation(request, model, g)
    store = server(request).store
    data = []
    for blob in await in_pool(request, encode_all, images, fmt):
        if response_format == "url":
            url = public_url(request, f"/images/{store.put(blob, fmt)}")
            data.append(ImageData(url=url, revised_prompt=g.prompt))
        else:
            data.append(ImageData(b64_json=b64(blob), revised_prompt=g.prompt))
    return ImagesResponse(
        created=int(time.time()), data=data, output_format=fmt, size=f"{g.width}x{g.height}"
    )


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
    """Text to image."""
    model = server(request).model(body.model)
    g = body.generation(model, body.prompt)
    return await respond(request, model, g, body.response_format, body.output_format)


async def read_upload(file: UploadFile | None) -> bytes | None:
    return None if file is None else await file.read(MAX_UPLOAD_BYTES + 1)


class ImageEditForm(ImageGenerationRequest):
    model_config = ConfigDict(strict=False)  # multipart fields are text: "20" is 20

    strength: float | None = Field(None, gt=0, le=1, description="img2img; default 0.8")


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True)
async def edits(
    request: Request,
    form: Annotated[ImageEditForm, Form()],
    image: UploadFile | None = File(None, description="the image to edit"),
    image_list: list[UploadFile] | None = File(None, alias="image[]"),
    mask: UploadFile | None = File(
        None, description="transparent (or, without alpha: white) = redraw"
    ),
) -> ImagesResponse:
    """Inpainting where a mask is given (or the image has transparent pixels), img2img
    (`strength`, default 0.8) where not."""
    served = server(request).model(form.model)
    uploads = [image] if image is not None else []
    uploads += image_list or []
    if not uploads:
        raise APIError(422, "required", "image")
    if len(uploads) > 1:
        field = "image[]" if image_list else "image"
        raise APIError(422, f"one image to edit, got {len(uploads)}", field)
    picture, mask_image = await in_pool(
        request, edit_images, await read_upload(uploads[0]), await read_upload(mask)
    )
    g = form.generation(served, form.prompt, image=picture, mask=mask_image)
    return await respond(request, served, g, form.response_format, form.output_format)


@router.get("/models")
def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(name) for name in server(request).models]}


@router.get("/models/{name}")
def model(name: str, request: Request) -> dict:
    return model_card(server(request).model(name, "name").name)


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "difusion"}
