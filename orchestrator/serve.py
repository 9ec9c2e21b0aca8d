"""`tandem serve`: Ray worker pools and the REST endpoint, as one command.

With no arguments it starts a local Ray, one context and one generation worker of the embedded
SmolLM2 on the CPU, and the endpoint on 127.0.0.1:8000; `--config serve.yaml` says otherwise
(orchestrator/serve_config.py), `--address auto` joins a running Ray cluster. The workers are
Ray actors (placed by their resources, restarted with a new epoch when they die); requests and
tokens go to them over gRPC. Ctrl-C stops the server, then the workers, then Ray.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

from tandem.orchestrator.autoscale_policy import AutoscalePolicyError, load_autoscale_policy
from tandem.orchestrator.autoscaler import Autoscaler
from tandem.orchestrator.cluster import Cluster
from tandem.orchestrator.planner import Planner
from tandem.orchestrator.planner_load import WorkerProfile
from tandem.orchestrator.serve_config import PoolConfig, ServeConfig, ServeConfigError, load_serve_config
from tandem.workers.cluster_auth import ClusterAuthError, load_cluster_auth

if TYPE_CHECKING:
    from tandem.orchestrator.app import AppState

logger = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="serve.yaml (model, pools, router, limits, server)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: start a local Ray")
    parser.add_argument("--host", default=None, help="override server.host")
    parser.add_argument("--port", type=int, default=None, help="override server.port")
    parser.add_argument("--api-key", default=None, help="require this Bearer token (or set server.api_key_env)")


def worker_arguments(config: ServeConfig, pool: PoolConfig) -> list[str]:
    """`tandem worker` arguments for one pool's workers."""
    args = ["--device", pool.device, "--dtype", pool.dtype, "--block-size", str(pool.block_size)]
    if config.model:
        args += ["--model", config.model]
    if pool.kv_cache_bytes:
        args += ["--kv-cache-bytes", str(pool.kv_cache_bytes)]
    if pool.tp_size > 1:
        args += ["--tensor-parallel-size", str(pool.tp_size)]
    security = config.security
    if security.tls_cert:
        args += ["--tls-cert", security.tls_cert, "--tls-key", security.tls_key or "", "--tls-ca", security.tls_ca or ""]
    return args


def run(args: argparse.Namespace) -> int:
    try:
        config = load_serve_config(args.config) if args.config else ServeConfig()
        planner = load_planner(config)
    except (ServeConfigError, AutoscalePolicyError, ClusterAuthError, ValueError, OSError) as error:
        print(f"tandem serve: error: {error}", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    api_key = args.api_key or (os.environ.get(config.server.api_key_env) if config.server.api_key_env else None)
    logging.getLogger("tandem").setLevel(logging.INFO)

    import ray
    import uvicorn

    from tandem.orchestrator.app import AppState, create_app

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        pools = autoscaler = None

        async def start() -> AppState:
            nonlocal pools, autoscaler
            state, pools = await start_cluster(config, api_key)
            if planner is not None:
                autoscaler = Autoscaler(planner, pools, state.cluster, state.interval_stats)
                autoscaler.start()
            print(f"Tandem is serving {state.served_model_name} at http://{host}:{port}/v1", flush=True)
            print(f"  curl http://{host}:{port}/v1/completions -H 'Content-Type: application/json' "
                  f"-d '{{\"model\": \"{state.served_model_name}\", \"prompt\": \"The capital of France is\", "
                  f"\"max_tokens\": 16, \"temperature\": 0}}'", flush=True)
            return state

        async def stop(state: AppState) -> None:
            print("Stopping the workers...", flush=True)
            if autoscaler is not None:
                await autoscaler.close()
            if pools is not None:
                await pools.stop()
            await state.cluster.close()

        server = uvicorn.Server(uvicorn.Config(create_app(start, stop), host=host, port=port, log_level="warning"))
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it
            pass
    finally:
        ray.shutdown()
    print("Stopped.", flush=True)
    return 0


def load_planner(config: ServeConfig) -> Planner | None:
    """The planner of the config's autoscale section (its policy and worker profile), or None."""
    if config.autoscale is None:
        return None
    policy = load_autoscale_policy(config.autoscale.policy)
    profile = WorkerProfile.from_json(Path(config.autoscale.profile).read_text(encoding="utf-8"))
    return Planner(policy, profile)


async def start_cluster(config: ServeConfig, api_key: str | None):
    """Start the pools, follow their workers, and build the app's state. Returns (state, pools)."""
    import ray

    from tandem.orchestrator.pools import PoolSpec, WorkerPools

    active = config.active_pools()
    block_size = next(iter(active.values())).block_size
    security = config.security
    auth = load_cluster_auth(security.cluster_token_file, security.tls_cert, security.tls_key, security.tls_ca)
    cluster = Cluster(block_size, auth=auth)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    specs = [
        PoolSpec(role, pool.count, worker_arguments(config, pool), num_cpus=pool.num_cpus,
                 num_gpus=pool.num_gpus if pool.num_gpus is not None else (pool.tp_size if has_gpus else 0),
                 resources=dict(pool.resources))
        for role, pool in active.items()
    ]
    pools = WorkerPools(specs, on_up=cluster.add, on_down=cluster.remove, auth=auth)
    started = time.monotonic()
    print(f"Starting {sum(s.count for s in specs)} workers ({', '.join(f'{s.count} {s.role}' for s in specs)}); "
          "loading the model...", flush=True)
    infos = await pools.start()
    print(f"Workers ready in {time.monotonic() - started:.0f} s", flush=True)
    return await app_state(cluster, infos[0].worker_id, config, api_key), pools


async def app_state(cluster: Cluster, tokenizer_worker_id: str, config: ServeConfig, api_key: str | None) -> AppState:
    """The app's state over a cluster whose workers are up: loads refreshed, the tokenizer from one
    worker, the router and limits of the config."""
    from tandem.orchestrator.app import AppState
    from tandem.orchestrator.pipeline import Pipeline
    from tandem.orchestrator.router import make_router
    from tandem.orchestrator.tokenizer import PromptTokenizer

    await cluster.refresh_loads()
    cluster.start()
    tokenizer = PromptTokenizer.from_model_info(await cluster.client(tokenizer_worker_id).model_info())
    router = make_router(config.router.policy, config.router.local_prefill_max_tokens)
    pipeline = Pipeline(cluster, router, max_retries=config.router.max_retries,
                        request_timeout_s=config.limits.request_timeout_s)
    return AppState(pipeline, cluster, tokenizer, served_model_name=config.served_model_name or tokenizer.model,
                    max_concurrent_requests=config.limits.max_concurrent_requests, api_key=api_key,
                    max_model_len=config.limits.max_model_len, max_request_bytes=config.limits.max_request_bytes,
                    request_body_timeout_s=config.limits.request_body_timeout_s)
