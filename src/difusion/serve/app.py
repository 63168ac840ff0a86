"""The application: models loaded once, the key check, the layers every request passes
(log line, body limit, security headers), the routes of the three protocols and the page,
and a stop that cancels every job at once."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import html
import threading
from importlib import resources
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from . import a1111, errors, loras, native, openai, variations
from .body import BodyLimit
from .codec import MAX_UPLOAD_BYTES
from .errors import APIError, SafeJSONResponse
from .middleware import RequestLog, SecurityHeaders
from .models import ServedModel, load_models
from .server import Server, ServeSettings, server

STATIC = Path(str(resources.files("difusion") / "serve" / "static"))
UPLOADS = 2 * MAX_UPLOAD_BYTES  # an image and its mask
BODY_LIMITS = {  # bytes a request body may have, by route; others: DEFAULT_BODY_LIMIT
    "/v1/images/edits": UPLOADS + 2**20,
    "/sdapi/v1/img2img": UPLOADS * 4 // 3 + 2**20,  # base64: 4 characters for 3 bytes
    "/api/generate": UPLOADS * 4 // 3 + 2**20,
    "/sdapi/v1/options": 2**16,
}
DEFAULT_BODY_LIMIT = 2**20


def body_limit(path: str) -> int:
    return BODY_LIMITS.get(path, DEFAULT_BODY_LIMIT)


def authorized(request: Request) -> bool:
    """`Authorization: Bearer KEY` (or HTTP Basic with KEY as the password, which
    AUTOMATIC1111's clients send), compared as UTF-8 bytes; True when there is no key."""
    key = server(request).settings.api_key
    if key is None:
        return True
    header = request.headers.get("authorization", "").encode("latin-1")  # the bytes sent
    scheme, _, value = header.partition(b" ")
    given = value.strip()
    if scheme.lower() == b"basic":
        try:
            given = base64.b64decode(given, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            given = b""
    elif scheme.lower() != b"bearer":
        given = b""
    return hmac.compare_digest(given, key.encode("utf-8"))


def require_key(request: Request) -> None:
    if not authorized(request):
        raise APIError(
            401,
            "a valid API key is needed: send 'Authorization: Bearer KEY' (on the page: open "
            "/?key=KEY)",
            "authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


class QuickStop(uvicorn.Server):
    """uvicorn's server, whose stop (SIGTERM, SIGINT) first ends every job of `app` (their
    clients answered 503), so that it does not wait for a running generation."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.app_server: Server = config.app.state.server

    def handle_exit(self, sig, frame) -> None:
        # in a thread: the signal may arrive while the loop holds a worker's lock
        threading.Thread(target=self.app_server.shut_down, name="shut-down").start()
        super().handle_exit(sig, frame)


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
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: /docs is our own
        redoc_url=None,
        default_response_class=SafeJSONResponse,
    )
    app.state.server = state
    errors.install(app)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, limit=body_limit)
    app.add_middleware(RequestLog)  # the outermost: it sees every answer, 413s included
    auth = [Depends(require_key)]
    app.include_router(openai.router, dependencies=auth)
    app.include_router(variations.router, dependencies=auth)
    app.include_router(a1111.router, dependencies=auth)
    app.include_router(loras.router, dependencies=auth)
    app.include_router(native.router, dependencies=auth)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", tags=["server"])
    def healthz(request: Request) -> dict:
        """ "ok"; with the key (or with none set), also the models and their queues."""
        s = server(request)
        if not authorized(request):
            return {"status": "ok"}
        queued = {name: len(w.pending) for name, w in s.workers.items()}
        return {"status": "ok", "models": list(s.models), "jobs": queued}

    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/images/{name}", tags=["server"], response_class=Response)
    def stored_image(name: str, request: Request) -> Response:
        item = server(request).store.get(name)
        if item is None:
            raise APIError(404, "no such image (images are kept for a while, then dropped)",
                           "name")  # fmt: skip
        data, fmt = item
        return Response(data, media_type=f"image/{fmt}")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(routes_page(app))

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    return app


def routes_page(app: FastAPI) -> str:
    """/docs: every route with its summary, on one self-contained page (no script, nothing
    from another host); /openapi.json has the schemas."""
    rows = []
    for path, operations in app.openapi()["paths"].items():
        for method, op in operations.items():
            text = op.get("description") or op.get("summary") or ""
            rows.append(
                f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(text.splitlines()[0] if text else '')}</td></tr>"
            )
    return (
        "<!doctype html><meta charset=utf-8><title>difusion API</title>"
        "<link rel=stylesheet href=/static/style.css><main><h1>difusion API</h1>"
        "<p>The schemas: <a href=/openapi.json>/openapi.json</a>. "
        "The reference: docs/serving.md in the project.</p>"
        f"<table><tr><th>method</th><th>path</th><th>what</th></tr>{''.join(rows)}</table></main>"
    )
