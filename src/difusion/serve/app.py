"""The application: models loaded once, the key check, one log line a request, and the
routes of the three protocols and the page."""

from __future__ import annotations

import base64
import contextlib
import hmac
import logging
import time
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from . import a1111, errors, native, openai, variations
from .errors import APIError
from .models import ServedModel, load_models
from .server import Server, ServeSettings, server

log = logging.getLogger("difusion.serve")
STATIC = Path(str(resources.files("difusion") / "serve" / "static"))


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
    app.include_router(variations.router, dependencies=auth)
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
