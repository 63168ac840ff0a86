"""Request bodies: a size limit for each route, enforced while the body is read and before
anything parses it; a time limit for reading it; JSON refused where a string holds a lone
surrogate (which no UTF-8 answer or tokenizer can take)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi import Request
from fastapi.routing import APIRoute

from .errors import APIError, lone_surrogate

READ_SECONDS = 60.0  # the longest a client may take to send its body


class BodyLimit:
    """ASGI middleware: reads each request's body, at most `limit(path)` bytes of it, within
    READ_SECONDS, then hands it to the app. Past the limit: 413 naming the body, and the
    connection closed (the rest is never read); too slow: 408."""

    def __init__(self, app, limit: Callable[[str], int]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        try:
            if int(declared) > limit:
                raise APIError(413, f"larger than this route's limit of {limit:,} bytes", "body")
            body = await asyncio.wait_for(read(receive, limit), READ_SECONDS)
        except APIError as e:
            e.headers = {**(e.headers or {}), "Connection": "close"}
            return await e.response()(scope, receive, send)
        except TimeoutError:
            error = APIError(408, f"not received within {READ_SECONDS:g} s", "body")
            return await error.response()(scope, receive, send)
        if body is None:  # the client left before sending it all
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def read(receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"larger than this route's limit of {limit:,} bytes", "body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class CheckedRequest(Request):
    async def json(self) -> object:
        if not hasattr(self, "_json"):
            try:
                value = json.loads(await self.body())
            except json.JSONDecodeError:
                raise
            except (ValueError, RecursionError) as e:  # an integer of 5,000 digits, [[[[...
                raise APIError(422, f"invalid JSON ({str(e).partition(':')[0]})", "body") from None
            where = lone_surrogate(value)
            if where is not None:
                raise APIError(
                    422, "holds a lone surrogate (such as \\ud800), which is not a character",
                    where,
                )  # fmt: skip
            self._json = value
        return self._json


class CheckedRoute(APIRoute):
    """A route whose JSON body is checked for lone surrogates before validation."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            return await handler(CheckedRequest(request.scope, request.receive))

        return checked
