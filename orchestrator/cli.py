"""The `tandem` command line. Each subcommand imports only what it needs, so `tandem --help`
and the orchestrator's own commands never pay for torch."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: disaggregated prefill/decode LLM serving.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_worker(commands)
    _add_serve(commands)
    _add_bench(commands)
    _add_plan(commands)
    _add_profile(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="generate text from a prompt on this machine (no server)")
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument("--model", default=None, help="HF checkpoint directory, .gguf file or synthetic (no model compute); default: embedded SmolLM2")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--device", default="auto")
    generate.add_argument("--dtype", default="auto")
    generate.set_defaults(run=_run_generate)


def _add_worker(commands: argparse._SubParsersAction) -> None:
    from tandem.workers.main import add_worker_arguments, run  # argparse and grpc only: no torch yet

    worker = commands.add_parser("worker", help="run one context, generation or aggregated worker (gRPC, no Ray)")
    add_worker_arguments(worker)
    worker.set_defaults(run=run)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    from tandem.orchestrator.serve import add_serve_arguments, run

    serve = commands.add_parser("serve", help="serve the OpenAI API over Ray worker pools (default: embedded model, local Ray)")
    add_serve_arguments(serve)
    serve.set_defaults(run=run)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    from tandem.orchestrator.bench import add_bench_arguments, run  # httpx only

    bench = commands.add_parser("bench", help="load-test an OpenAI-compatible endpoint: TTFT, ITL, throughput, goodput")
    add_bench_arguments(bench)
    bench.set_defaults(run=run)


def _add_plan(commands: argparse._SubParsersAction) -> None:
    from tandem.orchestrator.sim_cli import add_plan_arguments  # pure Python: no torch, no Ray

    plan = commands.add_parser("plan", help="dry-run an autoscaling policy: replicas over time, SLO attainment, GPU-hours")
    add_plan_arguments(plan)


def _add_profile(commands: argparse._SubParsersAction) -> None:
    profile = commands.add_parser("profile", help="measure one worker's capacity on this hardware for the planner")

    profile.add_argument("--model", default=None, help="HF checkpoint directory or .gguf file (default: embedded SmolLM2)")
    profile.add_argument("--device", default="auto")
    profile.add_argument("--dtype", default="auto")
    profile.add_argument("--prompt-tokens", type=int, default=512, help="typical prompt length of the workload")
    profile.add_argument("--output-tokens", type=int, default=128, help="typical output length of the workload")
    profile.add_argument("--itl-slo-ms", type=float, default=50.0, help="the inter-token latency SLO of the policy")
    profile.add_argument("--max-batch", type=int, default=256, help="largest decode batch to try")
    profile.add_argument("--kv-cache-bytes", type=int, default=None)
    profile.add_argument("--out", default="profile.json", help="where the planner's profile JSON goes")
    profile.add_argument(
        "--colocated", action="store_true",
        help="time each role while an engine of the other role runs beside it, each with half of the threads"
        " (workers that share a host)",
    )
    profile.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from tandem.workers.profile import run  # torch: only when profiling

    return run(args)


def _run_generate(args: argparse.Namespace) -> int:
    from tandem.workers import LLM, SamplingParams
    from tandem.workers.errors import InvalidRequestError, ModelLoadError

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
        llm = LLM(model=args.model, device=args.device, dtype=args.dtype)
        prompt = args.prompt
        if args.chat:
            prompt = llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        for out in llm.stream(prompt, params):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except (InvalidRequestError, ModelLoadError, ValueError) as e:
        print(f"tandem generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
