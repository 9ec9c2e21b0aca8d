"""`tandem plan --simulate`: dry-run an autoscaling policy against a trace or Poisson arrivals.

Reads the policy YAML and the worker profile JSON, builds the requests (a JSONL trace, or Poisson
arrivals at a fixed rate or a piecewise schedule `START:RATE,...`), runs simulator.py and prints the
replicas over time, SLO attainment, TTFT, throughput and GPU-hours; `--json` also writes them all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tandem.orchestrator.autoscale_policy import AutoscalePolicyError, load_autoscale_policy
from tandem.orchestrator.planner_load import WorkerProfile
from tandem.orchestrator.sim_cluster import SimParams
from tandem.orchestrator.sim_workload import SimRequest, TraceError, load_trace, poisson_requests
from tandem.orchestrator.simulator import format_report, simulate


_DEFAULT = SimParams()


def parse_rate(text: str) -> list[tuple[float, float]]:
    """`R` (requests/s from t=0) or `START:RATE,START:RATE,...`."""
    try:
        if ":" not in text:
            return [(0.0, float(text))]
        return [(float(a), float(b)) for a, b in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R or START:RATE,... got {text!r}") from None


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--simulate", action="store_true", help="dry-run the policy on the simulator (the only mode for now)")
    add("--policy", required=True, help="autoscaling policy YAML")
    add("--profile", required=True, help="worker profile JSON (prefill_tokens_per_s, decode_tokens_per_s, max_concurrent_seqs)")
    add("--trace", default=None, metavar="FILE.jsonl", help='lines of {"t": s, "prompt_tokens": n, "output_tokens": m}')
    add("--rate", type=parse_rate, default=None, help="Poisson arrivals: R requests/s, or START:RATE,... (piecewise)")
    add("--duration", type=float, default=None, help="seconds of Poisson arrivals")
    add("--prompt-tokens", type=int, default=1024)
    add("--output-tokens", type=int, default=128)
    add("--seed", type=int, default=0)
    add("--startup-s", type=float, default=_DEFAULT.startup_s, help="seconds from a scale-up to the worker serving")
    add("--kv-bytes-per-token", type=float, default=_DEFAULT.kv_bytes_per_token)
    add("--kv-bandwidth-gb-s", type=float, default=_DEFAULT.kv_bandwidth_gb_s, help="context -> generation GB/s")
    add("--router", default=_DEFAULT.router_policy, help="round_robin, least_load or kv_aware")
    add("--json", default=None, metavar="OUT.json", help="write the summary, timeline and per-request results")
    parser.set_defaults(run=run)


def _requests(args: argparse.Namespace) -> list[SimRequest]:
    if (args.trace is None) == (args.rate is None):
        raise ValueError("give exactly one of --trace and --rate")
    if args.trace is not None:
        return load_trace(args.trace)
    if args.duration is None:
        raise ValueError("--rate needs --duration")
    return poisson_requests(args.rate, args.duration, args.prompt_tokens, args.output_tokens, args.seed)


def run(args: argparse.Namespace) -> int:
    if not args.simulate:
        print("tandem plan: error: only --simulate is implemented", file=sys.stderr)
        return 2
    try:
        policy = load_autoscale_policy(args.policy)
        profile = WorkerProfile.from_json(Path(args.profile).read_text())
        params = SimParams(startup_s=args.startup_s, kv_bytes_per_token=args.kv_bytes_per_token,
                           kv_bandwidth_gb_s=args.kv_bandwidth_gb_s, router_policy=args.router, seed=args.seed)
        result = simulate(_requests(args), policy, profile, params, duration_s=args.duration or 0.0)
    except (AutoscalePolicyError, TraceError, ValueError, OSError) as e:
        print(f"tandem plan: error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
    return 0
