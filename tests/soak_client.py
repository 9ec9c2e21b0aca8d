"""The load side of tests/orchestrator/test_soak.py: N streaming completions opened at once, each
on its own connection, each classified by what the client saw. Run as a process of its own
(``python tests/soak_client.py URL N MAX_TOKENS TIMEOUT_S MODEL OUT``, which writes one JSON file), so that
its CPU and memory are not the orchestrator's, whose RSS the test measures in its own process.

Every request ends as exactly one outcome:

- ``completed``: 200, an SSE stream whose only finish_reason is ``length`` with ``max_tokens``
  completion tokens in its usage chunk, then ``data: [DONE]`` as the last event;
- ``error <status> <type>``: a status other than 200 with an OpenAI-shaped JSON error body (and
  Retry-After on 429 and 503);
- ``sse_error <type> <code>``: 200, then an OpenAI-shaped error event, then ``data: [DONE]``;
- ``lost <why>``: anything else: no answer within the timeout, a connection dropped without a
  status, a stream cut before ``[DONE]``, a body of another shape.

Whether an ``error`` status is one the orchestrator documents is the test's call, not this file's.
"""
from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

RETRY_AFTER_STATUSES = (429, 503)
MESSAGE_CHARS = 160


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # completed, error, sse_error, lost
    status: int  # HTTP status; 0 when none arrived
    detail: str  # the error type (and code), or why it was lost
    message: str  # the error's message, cut short ("" when none)
    seconds: float


def prompt(i: int) -> str:
    """Short prompts of 3 to about 14 tokens, all different (some below the local-prefill limit)."""
    return f"Soak {i}: " + "the lighthouse keeper " * (i % 4)


def request_body(i: int, max_tokens: int, model: str) -> dict[str, Any]:
    return {"model": model, "prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}


def _is_error_object(payload: Any) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def classify(status: int, headers: httpx.Headers, raw: bytes, max_tokens: int) -> tuple[str, str, str]:
    """(kind, detail, message) of one finished HTTP exchange."""
    if status != 200:
        try:
            payload = json.loads(raw)
        except ValueError:
            return "lost", f"{status} with a body that is not JSON: {raw[:80]!r}", ""
        if not _is_error_object(payload):
            return "lost", f"{status} with a body that is no OpenAI error: {raw[:80]!r}", ""
        if status in RETRY_AFTER_STATUSES and "retry-after" not in headers:
            return "lost", f"{status} without Retry-After", payload["error"]["message"][:MESSAGE_CHARS]
        return "error", payload["error"]["type"], payload["error"]["message"][:MESSAGE_CHARS]
    events = [event for event in raw.decode(errors="replace").split("\n\n") if event.strip()]
    if not events or events[-1].strip() != "data: [DONE]":
        return "lost", f"a stream cut before [DONE] after {len(events)} events", ""
    finishes, tokens, errors = [], None, []
    for event in events[:-1]:
        if not event.startswith("data: "):
            return "lost", f"an event that is not data: {event[:80]!r}", ""
        payload = json.loads(event[6:])
        if "error" in payload:
            if not _is_error_object(payload):
                return "lost", f"a malformed error event: {event[:120]!r}", ""
            errors.append(payload["error"])
            continue
        finishes += [c["finish_reason"] for c in payload.get("choices") or () if c.get("finish_reason")]
        if payload.get("usage"):
            tokens = payload["usage"]["completion_tokens"]
    if len(errors) > 1:
        return "lost", f"{len(errors)} error events", errors[0]["message"][:MESSAGE_CHARS]
    if errors:
        return "sse_error", f"{errors[0]['type']} {errors[0].get('code')}", errors[0]["message"][:MESSAGE_CHARS]
    if finishes == ["length"] and tokens == max_tokens:
        return "completed", "", ""
    return "lost", f"finish reasons {finishes}, {tokens} completion tokens of {max_tokens}", ""


async def one(http: httpx.AsyncClient, url: str, body: dict[str, Any], max_tokens: int, timeout_s: float) -> Outcome:
    start = time.monotonic()
    status, message = 0, ""
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", f"{url}/v1/completions", json=body) as reply:
                status = reply.status_code
                raw = await reply.aread()
        kind, detail, message = classify(status, reply.headers, raw, max_tokens)
    except TimeoutError:
        kind, detail = "lost", f"no complete answer within {timeout_s:g} s (status {status or 'none'})"
    except httpx.HTTPError as error:
        kind, detail = "lost", f"{type(error).__name__}: {error}"
    return Outcome(kind, status, detail, message, time.monotonic() - start)


async def soak(url: str, num_requests: int, max_tokens: int, timeout_s: float, model: str) -> list[Outcome]:
    """Open every request at once; each is bounded by ``timeout_s``, so the whole soak is too."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as http:
        return await asyncio.gather(*(
            one(http, url, request_body(i, max_tokens, model), max_tokens, timeout_s) for i in range(num_requests)
        ))


def main(argv: list[str]) -> None:
    url, num_requests, max_tokens, timeout_s, model, out = argv[0], int(argv[1]), int(argv[2]), float(argv[3]), *argv[4:6]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * num_requests)), hard))
    start = time.monotonic()
    outcomes = asyncio.run(soak(url, num_requests, max_tokens, timeout_s, model))
    with open(out, "w", encoding="utf-8") as file:  # a file, not stdout: the test need not read while it waits
        json.dump({"seconds": time.monotonic() - start, "outcomes": [asdict(o) for o in outcomes]}, file)


if __name__ == "__main__":
    main(sys.argv[1:])
