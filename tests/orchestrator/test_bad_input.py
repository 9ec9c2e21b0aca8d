"""Bad input at the REST endpoint, on a real local Ray: one aggregated worker of the synthetic model
(models/synthetic.py: the whole engine without matmuls) behind the app in a real uvicorn.

- schemathesis against the app's own /openapi.json: its coverage phase (boundary values, wrong
  methods), then Hypothesis-generated valid and invalid requests for every operation. No answer
  is a 5xx, no 200 stream carries a server error, every 4xx is an OpenAI error object, no request
  hangs; afterwards every block is free, no admission slot is held and a normal request succeeds.
- What a fuzzer does not send: a body over the size limit (declared, or chunked), deeply nested
  JSON, invalid UTF-8, integers past the worker protocol's types, a wrong Content-Type, an unknown
  route or method, a client that leaves mid-body or mid-stream, and a body trickled in slower than
  the body timeout. Each gets its exact OpenAI error and status, and the server serves the next
  request.
"""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import negative_data_rejection, not_a_server_error

from ray_serving import Served, serve_on_ray

MODEL = "synthetic"
MAX_REQUEST_BYTES = 256 << 10
BODY_TIMEOUT_S = 2.0
MAX_EXAMPLES = 40  # per operation and generation mode; with the coverage phase, about 900 requests in 6 s
MAX_TOKENS = 8  # fuzzed requests generate at most this much: the input is under test, not decoding
CALL_TIMEOUT_S = 30  # a fuzzed request that takes longer is a hang
NORMAL = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def served(local_ray) -> Iterator[Served]:
    from tandem.orchestrator.serve_config import ServeConfig

    pool = {"count": 1, "device": "cpu", "dtype": "float32", "kv_cache_bytes": 4 << 20}
    config = ServeConfig.model_validate({
        "model": MODEL, "mode": "aggregated", "pools": {"aggregated": pool},
        "limits": {"request_timeout_s": 60, "max_request_bytes": MAX_REQUEST_BYTES,
                   "request_body_timeout_s": BODY_TIMEOUT_S},
    })

    def keep_state(served: Served, state) -> None:
        served.extra["state"] = state

    with serve_on_ray(config, on_start=keep_state) as served:
        yield served


def assert_still_serving(url: str) -> None:
    reply = httpx.post(f"{url}/v1/completions", json=NORMAL, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4


def error(message: str, code: str | None = None, error_type: str = "invalid_request_error",
          param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def is_openai_error(body: object) -> bool:
    inner = body.get("error") if isinstance(body, dict) else None
    return (isinstance(inner, dict) and set(inner) == {"message", "type", "param", "code"}
            and isinstance(inner["message"], str) and bool(inner["message"]) and isinstance(inner["type"], str))


def requests_counted(url: str) -> dict[tuple[str, str], float]:
    """The app's request counter: (endpoint label, status) -> count."""
    text = httpx.get(f"{url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "tandem_requests")
    return {(s.labels["endpoint"], s.labels["status"]): s.value for s in family.samples if s.name.endswith("_total")}


# ----------------------------------------------------------------------------------------- fuzzing


def steer(case: Case, positive: bool) -> None:
    """What the schema cannot say, a valid request gets: the served model's name, and content in
    every message (only an assistant's may be null). Any request asks for at most MAX_TOKENS (a
    chat request without a limit would get the whole context)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if positive:
        body["model"] = MODEL
        for message in body.get("messages", []):
            if message.get("content") is None:
                message["content"] = "Hello"
    for key in ("max_tokens", "max_completion_tokens"):
        if type(body.get(key)) is int and body[key] > MAX_TOKENS:
            body[key] = MAX_TOKENS
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS


def call_and_check(case: Case, session: requests.Session) -> int:
    """Send one generated request and check its answer; returns the status."""
    positive = case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
    steer(case, positive)
    reply = case.call(session=session, timeout=CALL_TIMEOUT_S)  # a hang fails here
    checks = [not_a_server_error] + ([] if positive else [negative_data_rejection])
    case.validate_response(reply, checks=checks)
    if reply.status_code >= 400:
        assert is_openai_error(reply.json()), (reply.status_code, reply.text)
    elif reply.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        assert '"server_error"' not in reply.text and reply.text.rstrip().endswith("data: [DONE]"), reply.text
    return reply.status_code


def fuzz(op: APIOperation, mode: GenerationMode, session: requests.Session, statuses: list[int]) -> None:
    """MAX_EXAMPLES generated requests of one kind; derandomized, so that CI sends the same ones."""

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Case) -> None:
        statuses.append(call_and_check(case, session))

    run()


def test_fuzzed_requests_get_no_5xx_and_the_server_keeps_serving(served: Served) -> None:
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    posts = [op for op in operations if op.method == "post"]
    assert {op.label for op in posts} == {"POST /v1/completions", "POST /v1/chat/completions"}
    assert all(op.body for op in posts), "the schema must describe the request bodies, or nothing is fuzzed"
    statuses: dict[str, list[int]] = {op.label: [] for op in operations}
    with requests.Session() as session:
        for op in operations:
            config = schema.config.generation_for(operation=op)
            for case in schema.iter_coverage_cases(op, generation_modes=list(GenerationMode), generation_config=config):
                statuses[op.label].append(call_and_check(case, session))
            for mode in GenerationMode if op.body else [GenerationMode.POSITIVE]:  # a GET takes no input
                fuzz(op, mode, session, statuses[op.label])
    for op in posts:  # the fuzzer got past validation to the worker, and was refused too
        assert 200 in statuses[op.label] and 400 in statuses[op.label], (op.label, sorted(set(statuses[op.label])))
    served.wait_until_every_block_is_free(expected_workers=1)
    assert served.extra["state"].in_flight == 0  # every admission slot came back
    assert_still_serving(served.url)


# ------------------------------------------------------------------------------ hand-written cases


def test_a_body_over_the_size_limit_gets_413_before_it_is_read(served: Served) -> None:
    from tandem.orchestrator.serve_config import LimitsConfig

    assert LimitsConfig().max_request_bytes == 4 << 20  # the default; this module sets 256 KiB
    too_large = error(f"The request body is larger than this server's limit of {MAX_REQUEST_BYTES} bytes.",
                      "request_too_large")
    url = f"{served.url}/v1/completions"
    declared = httpx.post(url, content=b" " * (MAX_REQUEST_BYTES + 1), headers={"Content-Type": "application/json"})

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        yield b'{"model": "synthetic", "prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 65536 + 1):
            yield b"a" * 65536
        yield b'"}'

    chunked = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
    for reply in (declared, chunked):
        assert (reply.status_code, reply.json(), reply.headers["connection"]) == (413, too_large, "close")
    at_the_limit = json.dumps(NORMAL).encode().ljust(MAX_REQUEST_BYTES)  # JSON allows trailing spaces
    assert httpx.post(url, content=at_the_limit, headers={"Content-Type": "application/json"}).status_code == 200
    assert_still_serving(served.url)


DEPTH = 10_000  # at most 60 KB: under the size limit, far past the JSON parser's recursion limit


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"model": "synthetic", "prompt": "hi", "extra": ' + "[" * DEPTH + "]" * DEPTH + "}"),
    ("/v1/completions", '{"model": "synthetic", "prompt": ' + "[" * DEPTH + "]" * DEPTH + "}"),
    ("/v1/completions", '{"model": "synthetic", "prompt": "hi", "user": ' + '{"a":' * DEPTH + "1" + "}" * DEPTH + "}"),
    ("/v1/chat/completions", '{"model": "synthetic", "messages": ' + "[" * DEPTH + "]" * DEPTH + "}"),
], ids=["ignored-field", "prompt", "objects", "messages"])
def test_deeply_nested_json_gets_400(served: Served, path: str, body: str) -> None:
    reply = httpx.post(f"{served.url}{path}", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and is_openai_error(reply.json()), reply.text
    assert reply.json() == error(reply.json()["error"]["message"])  # no param, no code
    assert reply.json()["error"]["message"].startswith(
        "We could not parse the JSON body of your request: Invalid JSON: recursion limit exceeded")
    assert_still_serving(served.url)


@pytest.mark.parametrize("body", [
    b'{"model": "synthetic", "prompt": "\xff\xfe hi"}',  # bytes that never occur in UTF-8
    b'{"model": "synthetic", "prompt": "caf\xc3"}',  # a truncated two-byte character
    b'{"model": "synthetic", "prompt": "\xc0\xaf"}',  # an overlong "/"
    b'{"model": "synthetic", "prompt": "\xed\xa0\x80"}',  # a UTF-16 surrogate, encoded
    b'{"mod\xe9l": "synthetic", "prompt": "hi"}',  # in a key (Latin-1, not UTF-8)
    b'{"model": "synthetic", "messages": [{"role": "user", "content": "\xff"}]}',
], ids=["ff-fe", "truncated", "overlong", "surrogate", "key", "chat"])
def test_invalid_utf8_gets_400(served: Served, body: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    reply = httpx.post(f"{served.url}{path}", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json() == error(reply.json()["error"]["message"]), reply.text
    assert reply.json()["error"]["message"].startswith("We could not parse the JSON body of your request: Invalid JSON")
    assert_still_serving(served.url)


def test_an_escaped_lone_surrogate_gets_400(served: Served) -> None:
    """Valid UTF-8 bytes, but a string no tokenizer can encode."""
    reply = httpx.post(f"{served.url}/v1/completions", content=b'{"model": "synthetic", "prompt": "\\ud800 hi"}',
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json() == error(reply.json()["error"]["message"]), reply.text
    assert_still_serving(served.url)


@pytest.mark.parametrize("field, value, param, bound", [
    ("prompt", [2**32], "prompt.0", 2**32 - 1),
    ("stop_token_ids", [2**32], "stop_token_ids.0", 2**32 - 1),
    ("top_k", 2**31, "top_k", 2**31 - 1),
])
def test_integers_past_the_worker_protocols_types_get_400(served: Served, field: str, value: object, param: str,
                                                         bound: int) -> None:
    """Token ids travel to the workers as uint32 and top_k as int32: a larger value was a 500 (the
    fuzzer found it with a token id)."""
    reply = httpx.post(f"{served.url}/v1/completions", json={**NORMAL, field: value})
    message = f"Invalid value for '{param}': Input should be less than or equal to {bound}"
    assert (reply.status_code, reply.json()) == (400, error(message, param=param))


def test_a_negative_seed_is_served(served: Served) -> None:
    """OpenAI's seed is an int64; the worker protocol's is a uint64, which carries a negative seed
    as its two's complement (as torch reads it). It was a 500."""
    for seed in (-1, -(2**63), 2**64 - 1):
        reply = httpx.post(f"{served.url}/v1/completions", json={**NORMAL, "temperature": 1, "seed": seed}, timeout=60)
        assert reply.status_code == 200, (seed, reply.text)


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
])
def test_a_body_that_is_not_declared_json_gets_415(served: Served, content_type: str) -> None:
    """A browser page may send text/plain or a form to any origin without asking (CORS preflight
    covers application/json only): a JSON endpoint that took them could be driven cross-site."""
    url = f"{served.url}/v1/completions"
    reply = httpx.post(url, content=json.dumps(NORMAL), headers={"Content-Type": content_type})
    message = f"Unsupported Content-Type {content_type!r}: send the request body as application/json."
    assert (reply.status_code, reply.json()) == (415, error(message, "unsupported_media_type"))
    assert reply.headers["connection"] == "close"  # the body was not read
    for accepted in ("application/json; charset=utf-8", "application/vnd.tandem+json", None):
        headers = {"Content-Type": accepted} if accepted else {}  # no Content-Type at all is taken as JSON
        reply = httpx.post(url, content=json.dumps(NORMAL), headers=headers, timeout=60)
        assert reply.status_code == 200, (accepted, reply.text)


def test_an_unknown_route_or_method_gets_an_openai_error_and_mints_no_metric(served: Served) -> None:
    wrong_method = httpx.get(f"{served.url}/v1/completions")
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
    assert wrong_method.json() == error("Method Not Allowed: GET /v1/completions")
    unknown = httpx.post(f"{served.url}/v1/no-such-route-1234", json=NORMAL)
    not_found = error("Not Found: POST /v1/no-such-route-1234", error_type="not_found_error")
    assert (unknown.status_code, unknown.json()) == (404, not_found)
    endpoints = {endpoint for endpoint, _ in requests_counted(served.url)}
    assert "unmatched" in endpoints and not any("no-such-route" in endpoint for endpoint in endpoints)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _head(length: int) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length)


def test_a_client_that_leaves_mid_body_is_counted_499_not_as_a_server_error(served: Served) -> None:
    before = requests_counted(served.url)
    with _connect(served.url) as sock:
        sock.sendall(_head(1000) + b'{"model": "synthetic", "pro')
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while requests_counted(served.url).get(("/v1/completions", "499"), 0) == before.get(("/v1/completions", "499"), 0):
        assert time.monotonic() < deadline, requests_counted(served.url)
        time.sleep(0.1)
    after = requests_counted(served.url)
    assert {key for key, count in after.items() if count != before.get(key, 0)} == {("/v1/completions", "499")}
    assert_still_serving(served.url)


def test_a_client_that_leaves_mid_stream_aborts_the_request_and_frees_its_blocks(served: Served) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 100_000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()  # kept: a dropped line iterator would close the response already
        assert next(line for line in lines if line.startswith("data: "))  # tokens are flowing
        (stats,) = served.worker_stats().values()
        assert stats.num_running == 1 and stats.num_free_blocks < stats.num_total_blocks, stats
    left = time.monotonic()  # leaving the block closed the connection
    served.wait_until_every_block_is_free(expected_workers=1, timeout=30)
    # The whole stream (the context's 8,191 tokens) takes over 6 s here: it was aborted, not finished.
    assert time.monotonic() - left < 5
    assert served.extra["state"].in_flight == 0
    assert_still_serving(served.url)


def _read_reply(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """Read until the server closes: (status line, headers, body)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


def test_a_body_trickled_in_slower_than_the_body_timeout_gets_408(served: Served) -> None:
    body = json.dumps(NORMAL).encode()
    started = time.monotonic()
    with _connect(served.url) as sock:
        sock.sendall(_head(len(body)))
        sock.settimeout(0.25)
        answered = False
        for byte in body:  # a byte every 0.25 s: the whole body would take 20 s
            sock.sendall(bytes([byte]))
            try:
                answered = bool(sock.recv(1, socket.MSG_PEEK))
            except socket.timeout:
                continue
            break
        assert answered, "the server waited for the whole trickled body"
        elapsed = time.monotonic() - started
        sock.settimeout(10)
        status, headers, reply = _read_reply(sock)  # returns: the server closed the connection
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 5
    assert (status, headers["connection"]) == ("HTTP/1.1 408 Request Timeout", "close")
    timed_out = error(f"The request body did not arrive within {BODY_TIMEOUT_S:g} s.", "request_timeout")
    assert json.loads(reply) == timed_out
    assert_still_serving(served.url)
