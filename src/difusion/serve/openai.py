"""OpenAI's images API: generations, edits and the model list, as the official client
sends them. Extensions ride in the same body (the client's `extra_body`): negative_prompt,
steps, guidance, sampler, seed, strength."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from .codec import MAX_UPLOAD_BYTES, b64, encode, open_image, transparent_area
from .errors import APIError
from .models import Generation, GenerationOptions, ServedModel
from .server import run_generation, server

router = APIRouter(prefix="/v1", tags=["openai"])
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
    for image in images:
        blob = encode(image, fmt)
        if response_format == "url":
            url = str(request.url_for("stored_image", name=store.put(blob, fmt)))
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


async def read_upload(file: UploadFile | None, field: str):
    if file is None:
        return None
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    return open_image(data, field)


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
    if image is None and image_list:
        image = image_list[0]
    if image is None:
        raise APIError(422, "required", "image")
    picture = await read_upload(image, "image")
    mask_image = await read_upload(mask, "mask")
    if mask_image is not None:
        mask_image = transparent_area(mask_image) or mask_image.convert("L")
    else:
        mask_image = transparent_area(picture)
    g = form.generation(served, form.prompt, image=picture, mask=mask_image, strength=form.strength)
    return await respond(request, served, g, form.response_format, form.output_format)


@router.get("/models")
def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(name) for name in server(request).models]}


@router.get("/models/{name}")
def model(name: str, request: Request) -> dict:
    return model_card(server(request).model(name, "name").name)


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "difusion"}
