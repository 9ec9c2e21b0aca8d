"""The processes a benchmark script starts, and the frame every such script runs in: whatever it
started is stopped (SIGTERM included), and its result is printed with the model and the machine."""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_orchestrator_clients import raise_open_files_limit

READY_TIMEOUT_S = 180  # a worker loads torch and its model on a busy 2-core machine


class Processes:
    """Every process the benchmark starts. Each prints a JSON ready line on stdout; the rest of
    its stdout and its stderr go to a log file. `stop` ends them all, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: dict[str, tuple[subprocess.Popen, threading.Event, list[dict]]] = {}

    def launch(self, name: str, command: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env)
        ready, found = threading.Event(), []

        def drain() -> None:  # keeps reading after the ready line, so the pipe never blocks it
            for line in process.stdout:
                if not found and line.startswith(b'{"event": "ready"'):
                    found.append(json.loads(line))
                    ready.set()
                else:
                    log.write(line)
            log.close()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        self.started[name] = (process, ready, found)

    def wait_ready(self, name: str) -> dict:
        process, ready, found = self.started[name]
        ready.wait(READY_TIMEOUT_S)
        if not found:
            tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} did not become ready (exit code {process.poll()}):\n{tail}")
        return found[0]

    def pid(self, name: str) -> int:
        return self.started[name][0].pid

    def stop(self) -> None:
        for process, _, _ in reversed(self.started.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _, _ in reversed(self.started.values()):
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)



def run_and_report(args: argparse.Namespace, run: Callable[[argparse.Namespace, Processes], dict[str, Any]],
                   log_prefix: str, model: str) -> int:
    """Run ``run`` with a Processes that is stopped whatever happens (SIGTERM included), then print
    its result with the model and machine, and write it to ``args.out`` when given."""
    raise_open_files_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally below
    log_dir = Path(tempfile.mkdtemp(prefix=log_prefix))
    print(f"logs: {log_dir}", file=sys.stderr, flush=True)
    processes = Processes(log_dir)
    try:
        result = run(args, processes)
    finally:
        processes.stop()
    summary = {
        "model": model,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        **result,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
