"""The gate every HTTP request passes: the API key check and the per-endpoint request counter.

A plain ASGI middleware rather than FastAPI's ``@app.middleware("http")``: that one (Starlette's
BaseHTTPMiddleware) pipes every response body through an extra stream and task, which cost the
orchestrator about 100 us of CPU per streamed token and was its largest single cost with 1,000
streams open (scripts/bench_orchestrator.py). Here body messages go straight through; only the
status line is looked at.
"""
from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse

from tandem.orchestrator.openai_errors import APIError, error_body

OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers probe it)


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
            self.holder["metrics"].requests.labels(path, str(status)).inc()


def _authorized(scope: dict[str, Any], api_key: str) -> bool:
    presented = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
    return hmac.compare_digest(presented, f"Bearer {api_key}".encode())
