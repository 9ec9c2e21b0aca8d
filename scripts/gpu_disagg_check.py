"""Disaggregated workers on GPUs: a context and a generation worker process, KV over NIXL
(CUDA IPC), greedy tokens checked against transformers on the same GPU.

Builds a tiny random-weight Llama (nothing is downloaded), starts `tandem.workers.main` twice
per configuration (context on the first GPU, generation on the last one), and runs prompts of
1 to 150 tokens through Prefill -> Generate(handle). Configurations: blocks read where they are,
every handle staged (`--stage-min-runs 0`, the path for scattered blocks), and, with two GPUs,
workers of different tensor-parallel sizes (TP=1 context to a TP=2 generation worker on GPUs 0
and 1, and back), whose hand-offs re-split the kv heads over NCCL. Prints one JSON line per
configuration; exits 1 when a token differs.

    python scripts/gpu_disagg_check.py                          # context on the first GPU, generation on the last
    python scripts/gpu_disagg_check.py --devices cuda:0 cuda:0  # both on one GPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import grpc
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc

CONFIG = LlamaConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, architectures=["LlamaForCausalLM"],
)
PROMPTS = [[5, 17, 42, 7], list(range(3, 153)), [100], list(range(200, 231))]
NEW_TOKENS = 24


def start_worker(role: str, model_dir: str, device: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    command = [sys.executable, "-m", "tandem.workers.main", "--role", role, "--port", "0", "--model", model_dir,
               "--device", device, "--dtype", "float32", "--kv-cache-bytes", str(64 << 20), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sys.stderr)
    for line in process.stdout:
        if line.startswith(b'{"event": "ready"'):
            return process, json.loads(line)
    raise RuntimeError(f"{role} worker exited before it was ready")


def run(name: str, model_dir: str, hf, devices: tuple[str, str], extra: tuple[list[str], list[str]]) -> dict:
    """One context and one generation worker; ``extra``: their own arguments."""
    workers = [start_worker("context", model_dir, devices[0], *extra[0]),
               start_worker("generation", model_dir, devices[1], *extra[1])]
    try:
        stubs = [tandem_pb2_grpc.WorkerStub(grpc.insecure_channel(ready["address"])) for _, ready in workers]
        params = pb.SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        identical, reports = 0, []
        for i, prompt in enumerate(PROMPTS):
            start = time.perf_counter()
            reply = stubs[0].Prefill(pb.PrefillRequest(request_id=f"r{i}", prompt_token_ids=prompt, params=params), timeout=120)
            request = pb.GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompt, params=params,
                                         kv_handle=reply.kv_handle, first_token_id=reply.first_token_id)
            chunks = list(stubs[1].Generate(request, timeout=120))
            tokens = [reply.first_token_id] + [t for c in chunks for t in c.token_ids]
            with torch.inference_mode():
                ids = torch.tensor([prompt], device=hf.device)
                expected = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(prompt):]
            identical += tokens == expected.tolist()
            t = chunks[0].transfer
            reports.append({"blocks": t.num_blocks, "bytes": t.num_bytes, "descriptors": t.num_descriptors,
                            "staged": reply.kv_handle.HasField("staging_offset"), "transfer_ms": round(t.seconds * 1e3, 3),
                            "request_ms": round((time.perf_counter() - start) * 1e3, 1)})
        stats = [stub.Stats(pb.StatsRequest(), timeout=10) for stub in stubs]
        leaked = [s.num_total_blocks - s.num_free_blocks for s in stats]
        return {"config": name, "devices": devices, "identical": f"{identical}/{len(PROMPTS)}",
                "blocks_still_used": leaked, "transfers": reports}
    finally:
        for process, _ in workers:
            process.terminate()
            process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs=2, default=["cuda:0", f"cuda:{max(torch.cuda.device_count() - 1, 0)}"])
    devices = tuple(parser.parse_args().devices)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIG).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    ok = True
    with tempfile.TemporaryDirectory() as model_dir:
        hf.save_pretrained(model_dir, safe_serialization=True)
        hf = hf.to("cuda:0")
        staged = ["--staging-blocks", "64", "--stage-min-runs", "0"]
        configurations = [("direct", devices, ([], [])), ("staged", devices, (staged, staged))]
        if torch.cuda.device_count() >= 2:  # a TP=2 worker takes cuda:0 and cuda:1; the TP=1 one shares cuda:0
            tp2 = ["--tensor-parallel-size", "2"]
            configurations += [("tp1 to tp2", ("cuda:0", "cuda:0"), ([], tp2)), ("tp2 to tp1", ("cuda:0", "cuda:0"), (tp2, []))]
        for name, where, extra in configurations:
            result = run(name, model_dir, hf, where, extra)
            print(json.dumps(result), flush=True)
            ok &= result["identical"] == f"{len(PROMPTS)}/{len(PROMPTS)}" and not any(result["blocks_still_used"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
