"""Dynamo's standalone KV indexer (``python -m dynamo.indexer``, shipped in the ai-dynamo-runtime
wheel) as a test subprocess, and the part of its HTTP API the tests use: ``/register`` a worker's
vLLM-wire KV-event stream, ``/query`` prefix overlap in tokens, ``/dump`` the events it applied.

Life cycle: ``start()`` spawns it on a free port with HOME and TMPDIR in the test's own directory
and waits for ``/health``; ``stop()`` terminates it (then kills it) and closes the HTTP client.

Not named after a ``dynamo`` submodule on purpose: ``dynamo`` is a namespace package and tests/
is on ``sys.path``, so this folder is one of its portions.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from worker_rpc import free_port

MODEL = "tiny"
START_TIMEOUT_S = 10.0
WAIT_TIMEOUT_S = 10.0
_POLL_S = 0.02
_HEARTBEAT_EVERY = 5  # polls between heartbeats
# Without these the runtime binds and advertises the machine's interface address (docs: dynamo.md §3).
_LOOPBACK = ("DYN_TCP_RPC_HOST", "DYN_EVENT_PLANE_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_SYSTEM_HOST")

T = TypeVar("T")
Scores = dict[int, int]  # instance id -> prompt tokens its cached prefix covers (dp rank 0)


class StandaloneIndexer:
    """One ``python -m dynamo.indexer --threads 1`` process and an HTTP client for it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "indexer.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    def start(self, attempts: int = 3) -> None:
        """Spawn and wait for /health; a port taken between pick and bind costs one more attempt."""
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(home), "TMPDIR": str(home), **dict.fromkeys(_LOOPBACK, "127.0.0.1")}
        for _ in range(attempts):
            port = free_port()
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "dynamo.indexer", "--port", str(port), "--threads", "1"],
                    env=env, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            self._client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0, trust_env=False)
            if self._wait_healthy():
                return
            self.stop()
        raise AssertionError(f"dynamo.indexer did not become healthy; its log:\n{self.log()[-2000:]}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def register(self, instance_id: int, endpoint: str, replay_endpoint: str | None, block_size: int) -> None:
        body: dict[str, Any] = {"instance_id": instance_id, "endpoint": endpoint, "model_name": MODEL,
                                "block_size": block_size}
        if replay_endpoint is not None:
            body["replay_endpoint"] = replay_endpoint
        response = self._http().post("/register", json=body)
        assert response.status_code in (200, 201), response.text

    def scores(self, token_ids: Sequence[int]) -> Scores:
        """Device-tier overlap per instance, in tokens; instances with no overlap are absent."""
        response = self._http().post("/query", json={"token_ids": list(token_ids), "model_name": MODEL})
        assert response.status_code == 200, response.text
        per_rank = response.json()["scores"]
        assert all(set(ranks) == {"0"} for ranks in per_rank.values()), per_rank
        return {int(instance): ranks["0"] for instance, ranks in per_rank.items()}

    def query(self, token_ids: Sequence[int]) -> dict[str, Any]:
        """The whole /query answer (``instances`` has per-tier counts: gpu, cpu, disk)."""
        return self._http().post("/query", json={"token_ids": list(token_ids), "model_name": MODEL}).json()

    def dump(self) -> list[dict[str, Any]]:
        """The RouterEvents the indexer holds for MODEL (its tokens_hash is Dynamo's own)."""
        return self._http().get("/dump").json()[f"{MODEL}:default"]["events"]

    def wait_for(
        self, expected: Mapping[tuple[int, ...], Scores], heartbeat: Callable[[], None] | None = None
    ) -> None:
        """Poll /query until every prompt scores as expected (see :meth:`wait_until`)."""
        self.wait_until(lambda: {prompt: self.scores(prompt) for prompt in expected}, dict(expected), heartbeat)

    def wait_until(self, get: Callable[[], T], expected: T, heartbeat: Callable[[], None] | None = None) -> None:
        """Poll ``get()`` until it returns ``expected``, or fail after WAIT_TIMEOUT_S.

        ``heartbeat`` (an empty batch) makes a publisher's last batch recoverable: PUB/SUB drops
        what is sent before a subscription lands, and only a later seq reveals such a gap."""
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        polls = 0
        while (got := get()) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {got}, expected {expected}; indexer log tail:\n{self.log()[-1500:]}")
            polls += 1
            if heartbeat is not None and polls % _HEARTBEAT_EVERY == 0:
                heartbeat()
            time.sleep(_POLL_S)

    def _http(self) -> httpx.Client:
        assert self._client is not None, "indexer not started"
        return self._client

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            try:
                if self._http().get("/health", timeout=0.5).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(_POLL_S)
        return False
