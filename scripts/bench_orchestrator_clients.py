"""The clients of scripts/bench_orchestrator.py: a lean streaming HTTP client, the load generator
process, the /health probe, and per-process CPU time.

The client is raw HTTP/1.1 over asyncio streams (keep-alive, chunked SSE) rather than httpx: at a
thousand streams on two cores a general-purpose client costs more CPU than the server under test.
Every token of the synthetic model arrives as one SSE chunk with text (the benchmark picks token
ids that decode to text), so a chunk's arrival time is its token's.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tandem.orchestrator.bench_stats import summarize_ms

Json = dict[str, Any]


@dataclass(slots=True)
class StreamRecord:
    """One streamed completion, as the client saw it."""

    start: float
    status: int = 0
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk with text (a worker
    # sends a reader that fell behind several tokens in one chunk, so chunks can be fewer than tokens)
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the usage chunk
    done: bool = False  # saw `data: [DONE]`
    error: str | None = None

    def finished(self, max_tokens: int) -> bool:
        return (self.status == 200 and self.done and self.error is None and self.finish_reason == "length"
                and self.completion_tokens == max_tokens and 0 < len(self.token_times) <= max_tokens)


def completion_body(model: str, prompt_ids: list[int], max_tokens: int) -> bytes:
    return json.dumps({
        "model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()


class SSEConnection:
    """One keep-alive HTTP/1.1 connection that POSTs streaming completions, one at a time."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def stream(self, path: str, body: bytes) -> StreamRecord:
        record = StreamRecord(time.perf_counter())
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            self._writer.write(head + body)
            await self._read_response(self._reader, record)
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            record.error = f"{type(error).__name__}: {error}"
            await self.close()
        return record

    async def _read_response(self, reader: asyncio.StreamReader, record: StreamRecord) -> None:
        record.status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding: chunked")
        if not chunked:
            raise ValueError(f"HTTP {record.status} without a chunked body")
        pending = b""
        while size := int((await reader.readline()).strip(), 16):
            data = await reader.readexactly(size + 2)
            now = time.perf_counter()
            pending += data[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                _take_event(event, now, record)
        await reader.readline()  # the blank line after the last chunk

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._reader = None, None


def _take_event(event: bytes, now: float, record: StreamRecord) -> None:
    if not event.startswith(b"data: "):
        return
    if event == b"data: [DONE]":
        record.done = True
        return
    payload = json.loads(event[6:])
    if "error" in payload:
        record.error = str(payload["error"])
    for choice in payload.get("choices") or ():
        if choice.get("text"):
            record.token_times.append(now)
        record.finish_reason = choice.get("finish_reason") or record.finish_reason
    if payload.get("usage"):
        record.completion_tokens = payload["usage"]["completion_tokens"]


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (a thousand sockets and more); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the load generator: its own process, so that its CPU is not the driver's ----------------


def run_load(url: str, bodies: list[bytes], max_tokens: int, results) -> None:
    """Open one stream per body at once, each on its own connection; put a summary on `results`."""
    raise_open_files_limit()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        records = runner.run(_all_streams(url, bodies))
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    results.put(summarize_streams(records, max_tokens) | {"client_cpu_s": cpu.ru_utime + cpu.ru_stime})


async def _all_streams(url: str, bodies: list[bytes]) -> list[StreamRecord]:
    async def one(body: bytes) -> StreamRecord:
        connection = SSEConnection(url)
        try:
            return await connection.stream("/v1/completions", body)
        finally:
            await connection.close()

    return await asyncio.gather(*(one(body) for body in bodies))


def summarize_streams(records: list[StreamRecord], max_tokens: int) -> Json:
    """Completion count, TTFT, inter-token and end-to-end times, peak concurrency, tokens/s."""
    finished = [r for r in records if r.finished(max_tokens)]
    timed = [r for r in records if r.token_times]
    start = min(r.start for r in records)
    end = max((r.token_times[-1] for r in timed), default=start)
    tokens = sum(r.completion_tokens or len(r.token_times) for r in records)
    itl = [b - a for r in timed for a, b in zip(r.token_times, r.token_times[1:])]
    errors = sorted({r.error or f"status {r.status}, finish {r.finish_reason}, {len(r.token_times)} tokens"
                     for r in records if r not in finished})
    return {
        "streams": len(records),
        "finished": len(finished),
        "errors": errors[:5],
        "peak_open_streams": _peak_open(timed),
        "ttft_ms": summarize_ms([r.token_times[0] - r.start for r in timed]),
        "itl_ms": summarize_ms(itl),  # between chunks: a chunk may carry several tokens
        "chunks": sum(len(r.token_times) for r in records),
        "itl_max_ms": max(itl, default=0.0) * 1000,
        "e2e_ms": summarize_ms([r.token_times[-1] - r.start for r in timed]),
        "tokens": tokens,
        "duration_s": end - start,
        "t_start": start,  # perf_counter is CLOCK_MONOTONIC: comparable across processes
        "t_end": end,
        "tokens_per_s": tokens / (end - start) if end > start else 0.0,
    }


def _peak_open(records: list[StreamRecord]) -> int:
    """Most streams open at once: between sending the request and receiving the last token."""
    edges = sorted([(r.start, 1) for r in records] + [(r.token_times[-1], -1) for r in records])
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


# -- the /health probe: a thread with a blocking keep-alive connection --------------------------


class HealthProbe:
    """GET /health every `interval_s` from a thread; the latencies tell how long the server's event
    loop took to get to a cheap request."""

    def __init__(self, url: str, interval_s: float = 0.01) -> None:
        parts = urlsplit(url)
        self._connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (sent at, latency)
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._connection.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                self._connection.request("GET", "/health")
                response = self._connection.getresponse()
                response.read()
                if response.status == 200:
                    self.samples.append((started, time.perf_counter() - started))
                else:
                    self.failures += 1
            except (OSError, http.client.HTTPException):
                self.failures += 1
                self._connection.close()
            self._stop.wait(max(0.0, self.interval_s - (time.perf_counter() - started)))

    def summary(self, since: float = 0.0, until: float = float("inf")) -> Json:
        """Latencies of the probes sent between `since` and `until`."""
        latencies = [latency for sent, latency in self.samples if since <= sent <= until]
        return {"probes": len(latencies), "failures": self.failures, "ms": summarize_ms(latencies),
                "max_ms": max(latencies, default=0.0) * 1000}
