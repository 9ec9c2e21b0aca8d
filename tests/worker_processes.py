"""Worker processes for the disaggregation tests: started as `python -m tandem.workers.main`,
found through the JSON line they print when ready, and always stopped (SIGTERM, then SIGKILL)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
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
        self.signal_stop(sig)
        self.wait_stopped()

    def signal_stop(self, sig: int = signal.SIGTERM) -> None:
        """The first half of ``stop``: several workers wind down at once."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait_stopped(self) -> None:
        """The second half of ``stop``: SIGKILL after 15 s."""
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)


class _ReadyLine:
    """Reads the worker's ready line in a thread of its own, from the moment the worker starts;
    other stdout lines (NIXL logs there) are skipped."""

    def __init__(self, process: subprocess.Popen) -> None:
        self._process = process
        self._found: list[dict] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            if line.startswith(b'{"event": "ready"'):
                self._found.append(json.loads(line))
                return

    def wait(self, deadline: float) -> dict | None:
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return self._found[0] if self._found else None


@dataclass
class Launched:
    """A worker process that has been started and may not be ready yet."""

    command: list[str]
    process: subprocess.Popen
    ready_line: _ReadyLine
    log_path: Path


class StartWorker:
    """Starts the worker processes of one test module (the start_worker fixture); all of them stop
    when the module ends. ``start_worker(role, *args)`` starts one and waits until it is ready;
    ``start_worker.all(start_worker.launch(...), start_worker.launch(...))`` waits for workers
    launched together, which import torch and load their models side by side, not one after
    another (seconds each)."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._launched: list[Launched] = []
        self._started: list[WorkerProcess] = []

    def __call__(self, role: str, *args: str, env: Mapping[str, str] | None = None,
                 wrap: Sequence[str] = ()) -> WorkerProcess:
        """``wrap`` runs the worker through another command, e.g. ``ip netns exec <namespace>``."""
        (worker,) = self.all(self.launch(role, *args, env=env, wrap=wrap))
        return worker

    def launch(self, role: str, *args: str, env: Mapping[str, str] | None = None,
               wrap: Sequence[str] = ()) -> Launched:
        """Start a worker process without waiting for it (``all`` waits)."""
        log_path = self._log_dir / f"{role}-{len(self._launched)}.log"
        command = [*wrap, sys.executable, "-m", "tandem.workers.main", "--role", role, "--port", "0", *args]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # several workers share two cores
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=environment)
        launched = Launched(command, process, _ReadyLine(process), log_path)
        self._launched.append(launched)
        return launched

    def all(self, *launched: Launched) -> tuple[WorkerProcess, ...]:
        """Wait until every launched worker is ready; fail (each of them stopped) if one is not."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        readies = []
        for one in launched:
            try:
                ready = one.ready_line.wait(deadline)
            except BaseException:
                ready = None
            if ready is None:
                for other in launched:
                    _kill(other.process)
                pytest.fail(f"worker {one.command} did not become ready:\n{one.log_path.read_text(errors='replace')[-4000:]}")
            readies.append(ready)
        workers = []
        for one, ready in zip(launched, readies):
            channel = grpc.insecure_channel(ready["address"])
            workers.append(WorkerProcess(one.process, ready, channel, tandem_pb2_grpc.WorkerStub(channel), one.log_path))
        self._started.extend(workers)
        return tuple(workers)

    def stop_all(self) -> None:
        """SIGTERM to every worker, then wait for each: they wind down at once."""
        for worker in self._started:
            worker.signal_stop()
        for worker in self._started:
            worker.wait_stopped()
        for one in self._launched:  # any that never became ready
            _kill(one.process)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def start_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartWorker]:
    """Start workers for one test module; all of them stop when the module ends."""
    starter = StartWorker(tmp_path_factory.mktemp("worker-logs"))
    yield starter
    starter.stop_all()
