"""The standalone worker process: ``tandem worker --role context --port 50051``. No Ray needed.

Loads the model, allocates and registers the KV cache with NIXL, starts the KV-event publisher
and the gRPC server, then prints one JSON line (``{"event": "ready", ...}``) on stdout with the
address, epoch and endpoints, so that whoever started it (a test, Ray, a shell script) knows
where it listens. SIGTERM or SIGINT stops it: the server finishes in-flight RPCs for a short
grace period, then NIXL and ZMQ resources are closed.

``start_worker_server`` is all of that but the printing and the signals; the Ray actor
(ray_actor.py) runs it on a loop of its own.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

logger = logging.getLogger("tandem.worker")
SERVER_GRACE_S = 2.0  # in-flight RPCs may finish this long after a stop


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=["context", "generation", "aggregated"], default="aggregated")
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="interface the gRPC server and KV events bind to; auto: this node's cluster IP (0.0.0.0 binds all)",
    )
    parser.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (printed when ready)")
    parser.add_argument("--advertise-host", default=None, help="host peers use to reach this worker (default: --host)")
    parser.add_argument("--worker-id", default=None, help="stable name of this worker (default: role-hostname-port)")
    parser.add_argument("--model", default=None, help="HF checkpoint directory, .gguf file or synthetic (no model compute); default: embedded SmolLM2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache size (default: 1 GiB on CPU)")
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1,
        help="split the model over this many GPUs (ranks 1.. are child processes); any role: KV hand-offs"
        " re-split the kv heads between workers of different sizes",
    )
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--lease-seconds", type=float, default=30.0, help="how long handed-off KV stays pinned")
    parser.add_argument("--transfer-timeout", type=float, default=10.0, help="seconds one KV READ may take")
    parser.add_argument("--kv-events-port", type=int, default=0, help="ZMQ PUB port for KV events; 0 picks one")
    parser.add_argument("--kv-events-replay-port", type=int, default=0, help="ZMQ ROUTER replay port; 0 picks one")
    parser.add_argument(
        "--kv-events-encoding", choices=["map", "array"], default="map",
        help="KV events as tagged maps (vLLM >= #42892) or tagged arrays (older vLLM-format readers)",
    )
    parser.add_argument("--nixl-threads", type=int, default=0, help="UCX backend progress threads (0: NIXL default)")
    parser.add_argument(
        "--staging-blocks", type=int, default=None,
        help="staging slots that gather scattered blocks into one NIXL descriptor"
        " (default: an eighth of the KV blocks, at most 2048, on GPUs; none on CPU, where descriptors are cheap;"
        " a quarter of the KV blocks with --tensor-parallel-size > 1, whose hand-offs all go through staging)",
    )
    parser.add_argument(
        "--stage-min-runs", type=int, default=None,
        help="stage a handle's blocks when they form more runs of adjacent ids than this (default 32)",
    )
    parser.add_argument(
        "--cluster-token-file", default=None,
        help="file holding the cluster's shared token; calls without it are refused"
        " (default: $TANDEM_CLUSTER_TOKEN_FILE, else $TANDEM_CLUSTER_TOKEN, else no token)",
    )
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve gRPC over mutual TLS (with --tls-key, --tls-ca)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default=None, help="PEM CA that signed every cluster member's certificate")
    parser.add_argument(
        "--dynamo", action="store_true",
        help="also register with NVIDIA Dynamo's runtime (configured by DYN_* variables; see docs/dynamo.md)",
    )
    parser.add_argument("--dynamo-namespace", default="dynamo", help="Dynamo namespace to register in")


@dataclass
class RunningWorker:
    """A started worker: ``ready`` says where it listens; ``stop`` closes the gRPC server (after a
    short grace for in-flight RPCs), then the worker, the KV-event publisher and NIXL. Idempotent."""

    ready: dict[str, Any]
    worker: Any  # tandem.workers.worker.Worker (not imported here: `tandem --help` stays torch-free)
    _resources: contextlib.AsyncExitStack

    async def stop(self) -> None:
        await self._resources.aclose()

    def stop_first(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run callback at the start of stop(), before the server and the worker close."""
        self._resources.push_async_callback(callback)


def resolve_hosts(args: argparse.Namespace) -> tuple[str, str]:
    """(host to bind, host peers dial). ``--host auto`` binds this node's cluster address alone
    (``--advertise-host`` wins over the guess; the Ray actor passes Ray's node IP), never every
    interface: a worker takes no calls from outside the cluster's network by default."""
    if args.host == "auto":
        node = args.advertise_host or _node_ip()
        return node, node
    return args.host, args.advertise_host or args.host


async def start_worker_server(args: argparse.Namespace) -> RunningWorker:
    """Load the model, start the worker and its gRPC server; whatever started is closed again if
    a later step fails. Heavy imports here, so that `tandem --help` stays fast."""
    from tandem.kvtransfer.kv_event_stream import KVEventPublisher, kv_event_topic
    from tandem.kvtransfer.nixl_transfer import TransferEngine
    from tandem.proto import tandem_pb2_grpc
    from tandem.workers.cluster_auth import TokenChecker, load_cluster_auth
    from tandem.workers.peers import PeerClients
    from tandem.workers.server import WorkerService
    from tandem.workers.worker import Worker
    from tandem.workers.worker_types import Role, WorkerConfig

    epoch = time.time_ns() // 1000
    bind_host, advertise_host = resolve_hosts(args)
    auth = load_cluster_auth(args.cluster_token_file, args.tls_cert, args.tls_key, args.tls_ca)
    token_checker = TokenChecker(auth.token) if auth.token else None
    async with contextlib.AsyncExitStack() as resources:
        server = grpc.aio.server(interceptors=[token_checker] if token_checker else None)
        port = auth.add_port(server, f"{bind_host}:{args.port}")
        if port == 0:
            raise OSError(f"cannot bind gRPC to {bind_host}:{args.port}")
        resources.push_async_callback(server.stop, None)  # releases the port if a later step fails
        worker_id = args.worker_id or f"{args.role}-{socket.gethostname()}-{port}"
        address = f"{advertise_host}:{port}"
        engine, device, model_name = _load_engine(args)
        resources.callback(engine.close)  # tensor-parallel followers, if any
        transfer = TransferEngine(
            f"{worker_id}#{epoch}", engine.kv_cache, worker_id=worker_id, epoch=epoch,
            num_threads=args.nixl_threads, staging_blocks=_staging_blocks(args, engine, device),
            sharded=engine.sharded_kv(),
            **({} if args.stage_min_runs is None else {"stage_min_runs": args.stage_min_runs}),
        )
        resources.callback(transfer.close)
        topic = kv_event_topic(worker_id, epoch, model_name)
        publisher = KVEventPublisher(
            f"tcp://{bind_host}:{args.kv_events_port}",
            replay_endpoint=f"tcp://{bind_host}:{args.kv_events_replay_port}",
            topic=topic,
            # The tier of the worker's main KV cache, whatever the device: Dynamo reads "CPU" as a
            # host-offload tier and routes on "GPU" blocks only (vLLM sends "GPU" on a CPU too).
            medium="GPU",
            encoding=args.kv_events_encoding,
        )
        resources.callback(publisher.close)
        worker_config = WorkerConfig(
            role=Role(args.role), worker_id=worker_id, epoch=epoch, address=address, model=model_name,
            lease_seconds=args.lease_seconds, transfer_timeout_s=args.transfer_timeout,
        )
        worker = Worker(engine, worker_config, transfer, publisher, PeerClients(auth))
        kv_events = (_advertised(publisher.endpoint, advertise_host), _advertised(publisher.replay_endpoint, advertise_host), topic)
        refused = (lambda: token_checker.num_refused) if token_checker else (lambda: 0)
        tandem_pb2_grpc.add_WorkerServicer_to_server(WorkerService(worker, kv_events, refused), server)
        worker.start()
        resources.push_async_callback(worker.stop)
        await server.start()
        # Stopping unwinds in reverse: the server first (in-flight RPCs get a grace), then the
        # worker, the publisher, NIXL; the early server.stop above is then a no-op.
        resources.push_async_callback(server.stop, SERVER_GRACE_S)
        ready = {
            "event": "ready", "role": args.role, "worker_id": worker_id, "epoch": epoch, "address": address,
            "kv_events_endpoint": kv_events[0], "kv_events_replay_endpoint": kv_events[1], "kv_events_topic": topic,
            "num_blocks": engine.pool.num_blocks, "device": str(device),
            "dtype": str(engine.kv_cache_spec.dtype).removeprefix("torch."),
        }
        # Started: from here on the resources belong to the RunningWorker, not to this block.
        return RunningWorker(ready, worker, resources.pop_all())


def _load_engine(args: argparse.Namespace):
    """(LLMEngine, torch.device, model name) for the worker's arguments."""
    from tandem.models.loader import load_model
    from tandem.workers.config import CacheConfig, EngineConfig, resolve_device, resolve_dtype
    from tandem.workers.engine import LLMEngine
    from tandem.workers.scheduler import SchedulerConfig

    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        show_progress=False,
        cache=CacheConfig(block_size=args.block_size, num_bytes=args.kv_cache_bytes),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        tensor_parallel_size=args.tensor_parallel_size,
    )
    if args.tensor_parallel_size > 1:
        from tandem.models.source import resolve_model

        engine = LLMEngine.from_config(config)  # starts the follower ranks
        return engine, engine.device, resolve_model(config.model).name
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is not None:  # Triton launches on the current device
        import torch

        torch.cuda.set_device(device)
    loaded = load_model(config.model, dtype=resolve_dtype(config.dtype, device), device=device, show_progress=False)
    return LLMEngine(loaded, config, device), device, loaded.source.name


def _staging_blocks(args: argparse.Namespace, engine, device) -> int:
    if args.staging_blocks is not None:
        return args.staging_blocks
    if engine.tensor_parallel_size > 1:  # every hand-off goes through staging, both ways
        return max(1, engine.pool.num_blocks // 4)
    return min(engine.pool.num_blocks // 8, 2048) if device.type == "cuda" else 0


async def serve(args: argparse.Namespace) -> None:
    """The CLI path: start, print the ready line, serve until SIGTERM or SIGINT, stop."""
    if args.dynamo:
        from tandem.workers.dynamo import import_dynamo

        import_dynamo()  # before the model loads: a missing extra is said at once
    running = await start_worker_server(args)
    try:
        if args.dynamo:
            from tandem.workers.dynamo import DynamoBackend

            backend = DynamoBackend(running.worker, running.ready["kv_events_endpoint"], namespace=args.dynamo_namespace)
            await backend.start()
            running.stop_first(backend.stop)  # unregister before the worker stops answering
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        ready = running.ready
        print(json.dumps(ready), flush=True)
        logger.info("worker %s (%s, epoch %d) serving on %s", ready["worker_id"], ready["role"], ready["epoch"], ready["address"])
        await stop.wait()
        logger.info("stopping worker %s", ready["worker_id"])
    finally:
        await running.stop()


def _advertised(endpoint: str, host: str) -> str:
    """A bound endpoint (tcp://0.0.0.0:port) as peers should dial it."""
    port = endpoint.rsplit(":", 1)[-1]
    return f"tcp://{host}:{port}"


def _node_ip() -> str:
    """This host's outward IP: the source address of a route to a public address (a UDP
    connect sends nothing); the hostname's address where there is no such route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("8.8.8.8", 80))
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def run(args: argparse.Namespace) -> int:
    from tandem.workers.cluster_auth import ClusterAuthError
    from tandem.workers.dynamo import DynamoUnavailableError
    from tandem.workers.errors import ModelLoadError

    try:
        asyncio.run(serve(args))
    except (ModelLoadError, DynamoUnavailableError, ClusterAuthError, ValueError, OSError) as error:
        print(f"tandem worker: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem worker", description="Run one Tandem worker (no Ray).")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
