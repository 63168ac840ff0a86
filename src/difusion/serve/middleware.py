"""The ASGI layers around every route: one log line a request, a JSON 500 (never a reset
connection) for a fault no route foresaw, and the security headers."""

from __future__ import annotations

import logging
import time
from urllib.parse import quote

from .errors import APIError

log = logging.getLogger("difusion.serve")

# the page is this server's own files: no other origin, no frames, no inline script
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; "
     b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]  # fmt: skip


class RequestLog:
    """One log line a request, with its status and timings (the queue and generation times
    when a route records them in `request.state.timing`); the path percent-encoded, so that
    a %0a in it cannot start a forged line. An exception no route caught is logged with its
    traceback and answered 500 in the usual JSON shape, and the connection stays usable."""

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
        except Exception:
            log.exception("%s %s failed", scope["method"], logged_path(scope))
            if not status[0]:
                error = APIError(500, "the server failed on this request; its log has why")
                await error.response()(scope, receive, send_status)
        finally:
            timing = scope.get("state", {}).get("timing")
            log.info(
                "%s %s %s %.3fs%s",
                scope["method"],
                logged_path(scope),
                status[0] or "-",
                time.monotonic() - start,
                f" ({timing})" if timing else "",
            )


def logged_path(scope) -> str:
    return quote(scope["path"], safe="/:@!$&'()*+,;=-._~", errors="backslashreplace")


class SecurityHeaders:
    """ASGI middleware: SECURITY_HEADERS on every answer."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)
