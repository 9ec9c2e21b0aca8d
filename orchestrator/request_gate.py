"""The gate every HTTP request passes: the API key check, the request body's size and time
limits, and the per-endpoint request counter.

A body is refused before any of it is read when its Content-Length is over the limit (413), and
otherwise while it streams in: past the limit (413), or when it has not all arrived within the
body timeout (408, against a client that trickles it in). Both errors are APIErrors raised from
``receive``, so the app renders them as OpenAI errors; both close the connection. A client that
leaves before its body is complete is counted as 499 (nginx's "client closed request"), not as a
server error.

A plain ASGI middleware rather than FastAPI's ``@app.middleware("http")``: that one (Starlette's
BaseHTTPMiddleware) pipes every response body through an extra stream and task, which cost the
orchestrator about 100 us of CPU per streamed token and was its largest single cost with 1,000
streams open (scripts/bench_orchestrator.py). Here body messages go straight through; only the
status line is looked at.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any

from fastapi.responses import JSONResponse

from tandem.orchestrator.openai_errors import APIError, error_body

OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers probe it)
CLOSE = {"Connection": "close"}  # uvicorn closes the connection after such a response


class RequestGate:
    """``holder`` is filled with the app's ``state`` and ``metrics`` when the app starts."""

    def __init__(self, app: Any, holder: dict[str, Any]) -> None:
        self.app = app
        self.holder = holder

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        api_key = self.holder["state"].api_key
        if api_key and path not in OPEN_PATHS and not _authorized(scope, api_key):
            error = APIError.unauthorized()
            await JSONResponse(error_body(error), status_code=error.status)(scope, receive, send)
            return
        state = self.holder["state"]
        if _content_length(scope) > state.max_request_bytes:
            error = APIError.body_too_large(state.max_request_bytes)
            await JSONResponse(error_body(error), status_code=error.status, headers=CLOSE)(scope, receive, send)
            return
        receive = _BoundedBody(receive, state.max_request_bytes, state.request_body_timeout_s)
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees when the app fails before its status line

        async def send_and_note_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            # The route's path, not the request's: a client must not mint metric series (/v1/<random>).
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.holder["metrics"].requests.labels(endpoint, str(status)).inc()


def _authorized(scope: dict[str, Any], api_key: str) -> bool:
    presented = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
    return hmac.compare_digest(presented, f"Bearer {api_key}".encode())


def _content_length(scope: dict[str, Any]) -> int:
    """The declared body size; 0 when none is declared (or it is no number: the server refuses those)."""
    value = next((value for name, value in scope["headers"] if name == b"content-length"), b"0")
    return int(value) if value.isdigit() else 0


class _BoundedBody:
    """``receive`` of one request whose body may hold at most ``max_bytes`` and must have arrived
    ``timeout_s`` after the request started; once it has, messages (a disconnect) pass unbounded."""

    def __init__(self, receive: Any, max_bytes: int, timeout_s: float) -> None:
        self.receive, self.max_bytes, self.timeout_s = receive, max_bytes, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.num_bytes = 0
        self.complete = False

    async def __call__(self) -> dict[str, Any]:
        if self.complete:
            return await self.receive()
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise APIError.body_timeout(self.timeout_s) from None
        if message["type"] == "http.disconnect":
            raise APIError.client_closed()
        self.num_bytes += len(message.get("body", b""))
        if self.num_bytes > self.max_bytes:
            raise APIError.body_too_large(self.max_bytes)
        self.complete = not message.get("more_body", False)
        return message
