"""Refusals as one JSON shape that both OpenAI's and AUTOMATIC1111's clients read.

`{"detail": "steps: must be from 1 to 1000", "error": {"message", "type", "param", "code"}}`:
`detail` is what FastAPI clients, AUTOMATIC1111 tools and the page show; `error` is what the
`openai` client raises from. Every refusal names the field it is about.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class APIError(Exception):
    """A refusal: HTTP status, the field it is about (None for the request as a whole)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    @property
    def detail(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message

    def body(self) -> dict:
        kind = TYPES.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        error = {"message": self.detail, "type": kind, "param": self.param, "code": self.status}
        return {"detail": self.detail, "error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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
