"""One worker inside a Ray actor: the same gRPC server as ``tandem worker``, run on an asyncio loop
of its own (a daemon thread), so that Ray only places, restarts and stops it while requests and
tokens go over gRPC.

Life cycle: ``__init__`` parses the worker's CLI arguments and blocks until the server is up (a
failure there raises, and Ray then reports the actor dead with that error); ``ready`` says where
it listens; ``ping`` answers while its loop turns; ``stop`` shuts it down in order. A restart by
Ray runs ``__init__`` again in a fresh process: a new epoch and, with ``--port 0``, a new port.

This module is a plain class: the pool applies ``ray.remote`` to it, so importing it needs no
running Ray, and it imports neither Ray nor torch until an actor starts.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import sys
import threading
from typing import Any

from tandem.workers.main import RunningWorker, add_worker_arguments, start_worker_server

READY_TIMEOUT_S = 600.0  # model load and KV-cache registration
PING_TIMEOUT_S = 5.0  # a loop that cannot run a no-op for this long is stuck
STOP_TIMEOUT_S = 30.0
logger = logging.getLogger("tandem.worker")


class WorkerStartError(RuntimeError):
    """The worker server did not come up in time."""


def parse_worker_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tandem worker (Ray actor)")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.host == "auto" and args.advertise_host is None:
        import ray  # only here: a Ray worker process, where it is imported already

        args.advertise_host = ray.util.get_node_ip_address()
    return args


class WorkerActor:
    def __init__(self, argv: list[str], ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        args = parse_worker_args(argv)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tandem-worker-loop", daemon=True)
        self._thread.start()
        starting = asyncio.run_coroutine_threadsafe(start_worker_server(args), self._loop)
        try:
            self._running: RunningWorker = starting.result(ready_timeout_s)
        except concurrent.futures.TimeoutError as error:
            starting.cancel()
            raise WorkerStartError(f"worker {args.worker_id} not ready after {ready_timeout_s:.0f} s") from error
        self._stopped = False
        ready = self._running.ready
        logger.info("worker %s (%s, epoch %d) serving on %s", ready["worker_id"], ready["role"], ready["epoch"], ready["address"])

    def ready(self) -> dict[str, Any]:
        return dict(self._running.ready)

    def ping(self) -> bool:
        """True while the server runs and its event loop answers; raises when the loop is stuck."""
        if self._stopped or not self._thread.is_alive():
            return False
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(PING_TIMEOUT_S)
        return True

    def stop(self) -> None:
        """Ordered shutdown (gRPC server, worker, KV events, NIXL); the process stays until Ray
        kills it. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        logger.info("stopping worker %s", self._running.ready["worker_id"])
        asyncio.run_coroutine_threadsafe(self._running.stop(), self._loop).result(STOP_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
