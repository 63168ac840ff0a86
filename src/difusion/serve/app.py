"""The application: models loaded once, their queues, the key check, one log line a
request, and the routes of the three protocols and the page."""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from . import errors
from .errors import APIError
from .jobs import Job, Worker, wait_for
from .models import Generation, ServedModel, load_models

log = logging.getLogger("difusion.serve")
STATIC = Path(str(resources.files("difusion") / "serve" / "static"))


@dataclass
class ServeSettings:
    models: tuple[str, ...] = ("default",)  # "default", run folders, model or SD files
    api_key: str | None = None  # every API call then needs "Authorization: Bearer KEY"
    concurrency: int = 1  # generations at a time, per model
    queue_size: int = 8  # requests waiting per model before 429
    timeout: float = 300.0  # seconds a generation may run
    device: str = "cpu"
    dtype: str = "fp32"  # the U-Nets' weights: "fp32" or "bf16"


class ImageStore:
    """Results kept for `response_format=url`: the newest `size`, each for `ttl` seconds,
    behind unguessable names (so that a chat front end can show them without the key)."""

    def __init__(self, size: int = 256, ttl: float = 3600) -> None:
        self.size, self.ttl = size, ttl
        self.items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self.lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_urlsafe(18)}.{fmt}"
        with self.lock:
            self.items[name] = (time.monotonic() + self.ttl, data, fmt)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        with self.lock:
            item = self.items.get(name)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1], item[2]


class Server:
    """What the routes share: the models, their workers, the settings."""

    def __init__(self, settings: ServeSettings, models: dict[str, ServedModel]) -> None:
        if not models:
            raise ValueError("no model to serve")
        self.settings, self.models = settings, models
        self.workers = {
            name: Worker(m, settings.concurrency, settings.queue_size, settings.timeout)
            for name, m in models.items()
        }
        self.default = next(iter(models))
        self.store = ImageStore()
        self.options: dict = {"sd_model_checkpoint": self.default, "samples_format": "png"}

    def model(self, name: str | None, field: str = "model") -> ServedModel:
        if name in (None, ""):
            return self.models[self.default]
        if name not in self.models:
            raise APIError(
                422, f"unknown model {name!r}; this server has {', '.join(self.models)}", field
            )
        return self.models[name]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


def server(request: Request) -> Server:
    return request.app.state.server


async def run_generation(
    request: Request, model: ServedModel, g: Generation
) -> tuple[list[Image.Image], Generation, Job]:
    """Check the request against the model, queue it, wait for its images (the job stops if
    the client leaves), and note its timings for the log line."""
    g = model.check(g)
    worker = server(request).workers[model.name]
    job = Job(g)
    future = worker.submit(job)
    try:
        images = await wait_for(worker, job, future, request.is_disconnected)
    finally:
        request.state.timing = f"{model.name}, {job.timings}"
    return images, g, job


def require_key(request: Request) -> None:
    """`Authorization: Bearer KEY` (or HTTP Basic with KEY as the password, which
    AUTOMATIC1111's clients send) when the server has a key."""
    key = server(request).settings.api_key
    if key is None:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given = value.strip()
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            given = base64.b64decode(given).decode().partition(":")[2]
    elif scheme.lower() != "bearer":
        given = ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(
            401,
            "a valid API key is needed: send 'Authorization: Bearer KEY' (on the page: open "
            "/?key=KEY)",
            "authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


class RequestLog:
    """ASGI middleware: one log line a request, with its status and timings (the queue and
    generation times when a route records them in `request.state.timing`)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [0]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            timing = scope.get("state", {}).get("timing")
            log.info(
                "%s %s %s %.3fs%s",
                scope["method"],
                scope["path"],
                status[0] or "-",
                time.monotonic() - start,
                f" ({timing})" if timing else "",
            )


def create_app(settings: ServeSettings, models: dict[str, ServedModel] | None = None) -> FastAPI:
    """The app for `settings`; `models` (already loaded) are used instead of loading them."""
    from . import a1111, native, openai

    if models is None:
        models = load_models(
            list(settings.models), settings.device, settings.concurrency, settings.dtype
        )
    state = Server(settings, models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()

    app = FastAPI(
        title="difusion",
        summary="Diffusion models over HTTP: OpenAI's images API, AUTOMATIC1111's, a stream "
        "of step previews, and a page.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.server = state
    errors.install(app)
    app.add_middleware(RequestLog)
    auth = [Depends(require_key)]
    app.include_router(openai.router, dependencies=auth)
    app.include_router(a1111.router, dependencies=auth)
    app.include_router(native.router, dependencies=auth)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", tags=["server"])
    def healthz(request: Request) -> dict:
        s = server(request)
        queued = {name: len(w.pending) for name, w in s.workers.items()}
        return {"status": "ok", "models": list(s.models), "jobs": queued}

    @app.get("/images/{name}", tags=["server"], response_class=Response)
    def stored_image(name: str, request: Request) -> Response:
        item = server(request).store.get(name)
        if item is None:
            raise APIError(404, f"no image {name!r} (images are kept for an hour)", "name")
        data, fmt = item
        return Response(data, media_type=f"image/{fmt}")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    return app
