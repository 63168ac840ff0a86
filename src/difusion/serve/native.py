"""The project's own API: what the models can do, and a generation streamed as server-sent
events, one preview a step (the decoded x0 estimate), then the images."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict

from .body import CheckedRoute
from .codec import base64_images, data_url, encode_all
from .jobs import Job, Stopped, abandon
from .models import GenerationOptions
from .server import checked, in_pool, server

router = APIRouter(prefix="/api", tags=["native"], route_class=CheckedRoute)
log = logging.getLogger("difusion.serve")
END = object()  # after the job's last event


class GenerateRequest(GenerationOptions):
    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    image: str | None = None  # base64 or a data URL
    mask: str | None = None  # white = redraw


@router.get("/info")
def info(request: Request) -> dict:
    s = server(request)
    return {
        "default_model": s.default,
        "auth": s.settings.api_key is not None,
        "models": [m.info() for m in s.models.values()],
    }


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@router.post(
    "/generate",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "events: queued, "
               "start, progress (one a step, with a PNG preview), then done or error"}},
)  # fmt: skip
async def generate(body: GenerateRequest, request: Request) -> StreamingResponse:
    """Refusals answer before the stream starts (4xx); then the events, each `data` JSON."""
    s = server(request)
    model = s.model(body.model)
    image, mask = await in_pool(request, base64_images, body.image, body.mask)
    g = checked(request, model, body.generation(model, body.prompt, image=image, mask=mask))
    worker = s.workers[model.name]
    job = Job(g)
    events: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    job.listeners.append(
        lambda event, data: loop.call_soon_threadsafe(events.put_nowait, (event, data))
    )
    job.on_stop.append(  # a stop answers now, not at the running step's end
        lambda reason: (
            reason == "shutdown" and loop.call_soon_threadsafe(events.put_nowait, ("stop", {}))
        )
    )
    future = worker.submit(job)  # 429 here, before the stream
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, END))
    request.state.timing = f"{model.name}, streamed"

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield sse("queued", {"position": worker.position(job)})
            while (item := await events.get()) is not END:
                event, data = item
                if event == "stop":
                    raise Stopped(job.stop_reason)
                if "preview" in data:
                    data = {**data, "preview": data_url(data["preview"])}
                yield sse(event, data)
            if future.cancelled():  # taken off the queue before it started (a shutdown)
                raise Stopped(job.stop_reason)
            images = future.result()  # done: END follows its end
            parameters = {
                "model": model.name, "prompt": g.prompt, "negative_prompt": g.negative_prompt,
                "steps": g.steps, "guidance": g.guidance, "sampler": g.sampler, "seed": g.seed,
                "n": g.n, "width": g.width, "height": g.height, "strength": g.strength,
            }  # fmt: skip
            blobs = await in_pool(request, encode_all, images)
            yield sse("done", {
                "images": [data_url(b) for b in blobs], "parameters": parameters,
                "seconds": round(job.finished - job.started, 3),
            })  # fmt: skip
        except Stopped:
            err = worker.stop_error(job)
            yield sse("error", {"status": err.status, "detail": err.detail})
        except ValueError as e:
            yield sse("error", {"status": 422, "detail": str(e)})
        except Exception:  # a fault no check foresaw: the client still hears how it ended
            log.exception("the stream of job %s failed", job.id)
            yield sse("error", {"status": 500, "detail": "the server failed on this request"})
        finally:
            abandon(job, future)
            request.state.timing = f"{model.name}, {job.timings}"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
