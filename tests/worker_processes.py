"""Worker processes for the disaggregation tests: started as `python -m tandem.workers.main`,
found through the JSON line they print when ready, and always stopped (SIGTERM, then SIGKILL)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc

READY_TIMEOUT_S = 180  # model load on a loaded 2-core machine


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    ready: dict
    channel: grpc.Channel
    stub: tandem_pb2_grpc.WorkerStub
    log_path: Path

    @property
    def address(self) -> str:
        return self.ready["address"]

    def stats(self) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)


def _read_ready_line(process: subprocess.Popen, timeout: float) -> dict | None:
    """The worker's ready line; other stdout lines (NIXL logs there) are skipped."""
    found: list[dict] = []

    def read() -> None:
        for line in process.stdout:
            if line.startswith(b'{"event": "ready"'):
                found.append(json.loads(line))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


StartWorker = Callable[..., WorkerProcess]


@pytest.fixture(scope="module")
def start_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartWorker]:
    """Start workers for one test module; all of them stop when the module ends."""
    started: list[WorkerProcess] = []
    log_dir = tmp_path_factory.mktemp("worker-logs")

    def start(role: str, *args: str, env: Mapping[str, str] | None = None, wrap: Sequence[str] = ()) -> WorkerProcess:
        """``wrap`` runs the worker through another command, e.g. ``ip netns exec <namespace>``."""
        log_path = log_dir / f"{role}-{len(started)}.log"
        command = [*wrap, sys.executable, "-m", "tandem.workers.main", "--role", role, "--port", "0", *args]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # several workers share two cores
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=environment)
        try:
            ready = _read_ready_line(process, READY_TIMEOUT_S)
        except BaseException:
            ready = None
        if ready is None:
            process.kill()
            process.wait()
            pytest.fail(f"worker {command} did not become ready:\n{log_path.read_text(errors='replace')[-4000:]}")
        channel = grpc.insecure_channel(ready["address"])
        worker = WorkerProcess(process, ready, channel, tandem_pb2_grpc.WorkerStub(channel), log_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
