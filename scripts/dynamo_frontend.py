"""A Dynamo OpenAI frontend built from the runtime wheel alone (``ai-dynamo-runtime``).

``python -m dynamo.frontend`` lives in the full ``ai-dynamo`` package, which does not install
from PyPI alone on Python 3.11 (see ../shared/dynamo.md); this script is the same code path
(model discovery, tokenizer, chat template, router, HTTP) in a few lines, so that the tests and
docs/dynamo.md run Dynamo's real frontend without it. Configure discovery and the planes with the
same DYN_* variables as the workers.

    python scripts/dynamo_frontend.py --http-port 8787 --router-mode kv
"""
from __future__ import annotations

import argparse
import asyncio
import os

from dynamo.llm import EngineType, EntrypointArgs, KvRouterConfig, RouterConfig, RouterMode, make_engine, run_input
from dynamo.runtime import DistributedRuntime

_MODES = {"kv": RouterMode.KV, "round-robin": RouterMode.RoundRobin, "random": RouterMode.Random}


async def serve(args: argparse.Namespace) -> None:
    runtime = DistributedRuntime(
        asyncio.get_running_loop(), os.environ.get("DYN_DISCOVERY_BACKEND", "etcd"), os.environ.get("DYN_REQUEST_PLANE", "tcp"))
    router = RouterConfig(_MODES[args.router_mode], KvRouterConfig() if args.router_mode == "kv" else None)
    engine = await make_engine(runtime, EntrypointArgs(
        EngineType.Dynamic, http_host=args.http_host, http_port=args.http_port, router_config=router))
    try:
        await run_input(runtime, "http", engine)
    finally:
        runtime.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http-host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8787)
    parser.add_argument("--router-mode", choices=sorted(_MODES), default="kv")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
