"""OpenAI's `/v1/images/variations` (the client's `images.create_variation`): new pictures
of an uploaded picture's content, from its CLIP image embedding, by an unCLIP model.
Extensions ride in the same form: steps, guidance, sampler, seed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import ConfigDict

from ..unclip import UnclipPipeline
from .codec import open_image
from .errors import APIError
from .models import GenerationOptions
from .openai import Format, ImagesResponse, ResponseFormat, read_upload, respond
from .server import in_pool, server

router = APIRouter(prefix="/v1", tags=["openai"])


class VariationForm(GenerationOptions):
    model_config = ConfigDict(strict=False, extra="ignore")  # multipart fields are text

    response_format: ResponseFormat = "b64_json"
    output_format: Format = "png"


@router.post("/images/variations", response_model=ImagesResponse, response_model_exclude_none=True)
async def create_variation(
    request: Request,
    form: Annotated[VariationForm, Form()],
    image: UploadFile | None = File(None, description="the picture to vary"),
) -> ImagesResponse:
    served = server(request).model(form.model)
    if not isinstance(served.pipe, UnclipPipeline):
        raise APIError(
            422, f"{served.name} is not an unCLIP model: it makes no variations", "model"
        )
    if image is None:
        raise APIError(422, "required", "image")
    picture = await in_pool(request, open_image, await read_upload(image), "image")
    g = form.generation(served, "", vary=picture)
    return await respond(request, served, g, form.response_format, form.output_format)
