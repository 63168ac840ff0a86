"""Refusals as one JSON shape that both OpenAI's and AUTOMATIC1111's clients read.

`{"detail": "steps: must be from 1 to 1000", "error": {"message", "type", "param", "code"}}`:
`detail` is what FastAPI clients, AUTOMATIC1111 tools and the page show; `error` is what the
`openai` client raises from. Every refusal names the field it is about.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class APIError(HTTPException):
    """A refusal: HTTP status, the field it is about (None for the request as a whole).

    An HTTPException, so that FastAPI passes it through as it is when it rises while the body
    is read (the surrogate check in `checked_json`)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict | None = None
    ) -> None:
        self.status, self.message, self.param = status, message, param
        super().__init__(status, f"{param}: {message}" if param else message, headers)

    def body(self) -> dict:
        kind = TYPES.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        error = {"message": self.detail, "type": kind, "param": self.param, "code": self.status}
        return {"detail": self.detail, "error": error}

    def response(self) -> JSONResponse:
        return SafeJSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of validation errors -> the first one, naming its field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
    if err.get("type") == "json_invalid":
        return APIError(
            422, f"invalid JSON ({err.get('ctx', {}).get('error', 'unreadable')})", "body"
        )
    message = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        message = "required"
    return APIError(422, message, ".".join(loc) or "body")


def lone_surrogate(value: object) -> str | None:
    """The field (dotted path) of the first string in parsed JSON, keys included, that holds
    a lone surrogate (JSON's "\\ud800" escape parses into one, and no UTF-8 can carry it back
    out), or None."""
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, item = stack.pop()
        texts: list = [item]
        if isinstance(item, dict):
            texts = list(item)
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(item))
        for text in texts:
            if isinstance(text, str) and not text.isascii() and not encodable(text):
                return printable(path) or "body"
    return None


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with lone surrogates and control characters escaped: safe in a log line and
    in UTF-8."""
    return "".join(
        c if c.isprintable() and encodable(c) else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a string no UTF-8 can carry still makes a
    valid answer, never an exception in the middle of one."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=exc.headers).response()
