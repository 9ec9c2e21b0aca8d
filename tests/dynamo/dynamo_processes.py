"""A Dynamo deployment on loopback for the tests: file discovery in a fresh folder (so that each
test module is its own Dynamo world), the TCP request plane, the ZMQ event plane, every host
variable set to 127.0.0.1, and Dynamo's OpenAI frontend from scripts/dynamo_frontend.py."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from openai import OpenAI

from tandem.models.gguf_metadata_cache import cache_root
from tandem.orchestrator.tokenizer import PromptTokenizer
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc

from worker_rpc import free_port

FRONTEND_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "dynamo_frontend.py"
READY_TIMEOUT_S = 60


def dynamo_env(folder: Path) -> dict[str, str]:
    """What every process of one deployment shares (docs/dynamo.md lists the same)."""
    home = folder / "home"  # Dynamo caches model cards under ~/.cache: keep the tests' out of the user's
    home.mkdir(exist_ok=True)
    return {
        "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(folder / "discovery"),
        "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
        "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1",
        "DYN_SELF_HOST_METADATA": "0", "HF_HUB_OFFLINE": "1", "HOME": str(home),
        "TANDEM_CACHE_DIR": str(cache_root()),  # the user's, not the new HOME's: the GGUF metadata is built once
    }


@dataclass
class Frontend:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)

    def wait_for_model(self, timeout: float = READY_TIMEOUT_S) -> str:
        """The served model's name, once the frontend has discovered a worker that serves it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the Dynamo frontend exited:\n{self.log()[-4000:]}")
            try:
                models = httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"]
            except httpx.TransportError:
                models = []
            if models:
                return models[0]["id"]
            time.sleep(0.2)
        pytest.fail(f"no model reached the Dynamo frontend in {timeout} s:\n{self.log()[-4000:]}")


@dataclass
class Deployment:
    frontend: Frontend
    workers: list  # WorkerProcess (tests/worker_processes.py), in the order of their roles
    model: str
    client: OpenAI


@contextlib.contextmanager
def deploy(start_worker, folder: Path, roles: list[str], router_mode: str, *worker_args: str) -> Iterator[Deployment]:
    """A frontend, then Tandem workers of these roles registered with --dynamo, in one fresh
    Dynamo world; the model is served once the frontend lists it. The workers stop with their
    test module (start_worker), the frontend here."""
    env = dynamo_env(folder)
    frontend = start_frontend(env, folder / "frontend.log", router_mode)
    try:
        workers = start_worker.all(*(start_worker.launch(role, "--dynamo", *worker_args, env=env) for role in roles))
        model = frontend.wait_for_model()
        client = OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", timeout=120, max_retries=0)
        yield Deployment(frontend, workers, model, client)
    finally:
        frontend.stop()


def start_frontend(env: dict[str, str], log_path: Path, router_mode: str = "kv") -> Frontend:
    port = free_port()
    command = [sys.executable, str(FRONTEND_SCRIPT), "--http-port", str(port), "--router-mode", router_mode]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    return Frontend(process, f"http://127.0.0.1:{port}", log_path)


def tandem_greedy(worker, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """(token ids, text) that a Tandem worker answers on its own gRPC API: the reference."""
    request = pb.GenerateRequest(request_id=f"reference-{time.monotonic_ns()}", prompt_token_ids=prompt_ids,
                                 params=pb.SamplingParams(max_tokens=max_tokens))
    chunks = list(worker.stub.Generate(request, timeout=120))
    return [t for chunk in chunks for t in chunk.token_ids], "".join(chunk.text for chunk in chunks)


def tokenizer_of(worker) -> PromptTokenizer:
    """The worker's tokenizer, as Tandem's orchestrator loads it: to build reference prompts."""
    options = [("grpc.max_receive_message_length", 64 << 20)]  # tokenizer.json can pass gRPC's 4 MiB
    with grpc.insecure_channel(worker.address, options=options) as channel:
        info = tandem_pb2_grpc.WorkerStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    return PromptTokenizer.from_model_info(info)
