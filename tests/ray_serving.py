"""The REST app over Ray worker pools, wired by the same function as `tandem serve`, for tests:
the pools and uvicorn on a free port, stopped at the end, on the session's local Ray (below). Plus
what those tests ask the workers directly (Stats) and wait for (every block free).

The local Ray is shared: ``ray.init`` takes ~3.4 s and ``ray.shutdown`` ~1.4 s on two busy cores,
and a module leaves no actor behind (``WorkerPools.stop`` kills its actors and waits until they are
gone). A module that needs it asks for the ``local_ray`` fixture (tests/conftest.py), which starts
it if it is not running; tests/conftest.py stops it after the last test that asked, and a test
that must find no Ray in this process calls ``stop_local_ray`` first."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psutil
import ray

from tandem.orchestrator.worker_client import WorkerClient
from tandem.workers.cluster_auth import ClusterAuth
from worker_rpc import Server

WAIT_S = 180  # workers load torch and a model on a busy 2-core machine


class Served:
    """A running app: its URL, its pools, and its event loop (the pools' calls run there)."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.pools: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.extra: dict[str, Any] = {}  # what an on_start hook built
        self.auth = ClusterAuth()  # the cluster token and TLS the orchestrator calls workers with

    @property
    def url(self) -> str:
        return self.server.url

    def on_app_loop(self, coro: Awaitable[Any], timeout: float = WAIT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def worker_stats(self) -> dict[str, Any]:
        """Each serving worker's Stats, by worker id."""
        async def ask() -> dict[str, Any]:
            return {info.worker_id: await stats_of(info.address, self.auth) for info in self.pools.workers()}

        return asyncio.run(ask())

    def wait_until_every_block_is_free(self, expected_workers: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.worker_stats()
            if len(stats) == expected_workers and all(
                s.num_free_blocks == s.num_total_blocks and not s.num_leases and not s.num_running for s in stats.values()
            ):
                return
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)


@contextlib.contextmanager
def serve_on_ray(config: Any, on_start: Callable[[Served, Any], None] | None = None) -> Iterator[Served]:
    """``config``: a ServeConfig; ``on_start(served, state)`` runs on the app's loop once the pools
    serve. The caller asks for the local_ray fixture, so that the local Ray is stopped after it."""
    from tandem.orchestrator.app import AppState, create_app
    from tandem.orchestrator.serve import start_cluster

    served = Served()

    async def start() -> AppState:
        served.loop = asyncio.get_running_loop()
        state, served.pools = await start_cluster(config, None)
        served.auth = state.cluster.auth
        if on_start is not None:
            on_start(served, state)
        return state

    async def stop(state: AppState) -> None:
        await served.pools.stop()
        await state.cluster.close()

    start_local_ray()
    served.server = Server(create_app(start, stop), start_timeout_s=WAIT_S)
    try:
        yield served
    finally:
        served.server.stop()


_local_ray_running = False  # started by start_local_ray and not stopped since


def start_local_ray(attempts: int = 2) -> None:
    """The local Ray of the tests that share it (see the module's docstring), started if it is not.

    A second attempt where the first one's raylet never registered, or its GCS never wrote its
    port file: Ray gives each a fixed wait, and in CI on two busy cores each happened once (no
    raylet log; "Timed out waiting for file .../gcs_server_port_..."), while the next module's Ray
    came up normally. The failed ``ray.init`` leaves its GCS and monitors running with no
    handle to stop them, so the processes it started are killed before the retry."""
    global _local_ray_running
    if ray.is_initialized():
        return
    for attempt in range(1, attempts + 1):
        children_before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024**2,
                     configure_logging=False)
            break
        except Exception as e:  # Ray raises a bare Exception for this
            startup_timeout = "timed out during startup" in str(e) or "Timed out waiting for file" in str(e)
            if not startup_timeout or attempt == attempts:
                raise
            for child in psutil.Process().children(recursive=True):
                if child.pid not in children_before:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
    _local_ray_running = True


def stop_local_ray() -> None:
    """Stop the shared local Ray if it runs (never a Ray this process joined some other way)."""
    global _local_ray_running
    if _local_ray_running:
        ray.shutdown()
        _local_ray_running = False


async def stats_of(address: str, auth: ClusterAuth = ClusterAuth()):
    client = WorkerClient(address, timeout_s=10, auth=auth)
    try:
        return await client.stats()
    finally:
        await client.close()
