"""How many runs of adjacent block ids (NIXL descriptors) a prompt's hand-off needs once both
workers' pools have churned, with the real BlockPool on both sides.

A context pool prefills prompts under a per-step token budget (chunks of several prompts
interleave, as in the scheduler), caches every full block, and frees a prompt's blocks, tail
first, once the generation pool has taken them. The generation pool reserves a prompt's blocks in
one allocation, grows each running request by a block every ``block_size`` tokens while the others
decode, caches, and frees a finished request tail first. No prefixes are shared, so every hand-off
moves all its blocks. Only hand-offs after both pools have handed out every block three times count.

    python scripts/sim_block_runs.py                        # 2k-token prompts, 256-token outputs
    python scripts/sim_block_runs.py --prompt-tokens 512 --handoffs 400 --json runs.json

``churned_handoffs`` is what ``scripts/bench_transfer.py`` reads as its "after churn" id layout.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import dataclass, field

from tandem.kvtransfer.block_hash import BlockHash, hash_block_tokens
from tandem.kvtransfer.block_pool import BlockPool
from tandem.kvtransfer.block_runs import coalesce_runs, num_runs


@dataclass
class _Request:
    """A request's token ids (unique to it) and the blocks it holds on one pool."""

    tokens: list[int]
    num_prompt: int
    block_ids: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)
    num_done: int = 0  # tokens computed (context) or held (generation)


def _room(pool: BlockPool, req: _Request, num_tokens: int) -> bool:
    """Grow req's blocks to hold num_tokens; False (nothing taken) when the pool is short."""
    need = -(-num_tokens // pool.block_size) - len(req.block_ids)
    if need > pool.num_free_blocks:
        return False
    req.block_ids += pool.allocate(max(0, need))
    return True


def _cache_full(pool: BlockPool, req: _Request) -> None:
    for index in range(len(req.hashes), req.num_done // pool.block_size):
        tokens = req.tokens[index * pool.block_size : (index + 1) * pool.block_size]
        parent = req.hashes[-1] if req.hashes else None
        req.hashes.append(hash_block_tokens(parent, tokens))
        pool.cache_full_block(req.block_ids[index], req.hashes[-1], parent, tokens)


def churned_handoffs(
    context_blocks: int, generation_blocks: int, prompt_tokens: int, output_tokens: int, num_handoffs: int,
    block_size: int = 16, step_tokens: int = 8192, seed: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """(context block ids, generation block ids) of each counted hand-off, in block order.

    Lengths vary uniformly by +-25% around prompt_tokens and output_tokens.
    """
    rng = random.Random(seed)
    context, generation = BlockPool(context_blocks, block_size), BlockPool(generation_blocks, block_size)
    prefilling: list[_Request] = []
    decoding: list[_Request] = []
    handoffs: list[tuple[list[int], list[int]]] = []
    allocated_before = {"context": 0, "generation": 0}
    next_token = 0

    def new_request() -> _Request:
        nonlocal next_token
        num_prompt = rng.randint(prompt_tokens * 3 // 4, prompt_tokens * 5 // 4)
        total = num_prompt + rng.randint(output_tokens * 3 // 4, output_tokens * 5 // 4)
        next_token += total
        return _Request(list(range(next_token - total, next_token)), num_prompt)

    arriving = new_request()
    for _ in range(1000 * num_handoffs):
        if len(handoffs) >= num_handoffs:
            break
        budget = step_tokens  # context step: chunks of the oldest prompts first, new ones fill up
        progressed = False
        for req in prefilling:
            chunk = min(budget, req.num_prompt - req.num_done)
            if chunk and _room(context, req, req.num_done + chunk):
                req.num_done, budget, progressed = req.num_done + chunk, budget - chunk, True
        while budget > 0 and _room(context, arriving, min(budget, arriving.num_prompt)):
            chunk = min(budget, arriving.num_prompt)
            arriving.num_done, budget, progressed = chunk, budget - chunk, True
            prefilling.append(arriving)
            arriving = new_request()
        if not progressed and all(r.num_done < r.num_prompt for r in prefilling):  # stuck: the engine
            context.free(prefilling.pop().block_ids[::-1])  # would preempt the newest; here it leaves
        for req in [r for r in prefilling if r.num_done == r.num_prompt]:  # hand off what is prefilled
            _cache_full(context, req)
            taken = _Request(req.tokens, req.num_prompt)
            if not _room(generation, taken, req.num_prompt):
                break  # the generation pool is full: the prompt waits, its blocks pinned
            prefilling.remove(req)
            allocated_before["generation"] += len(taken.block_ids)
            allocated_before["context"] += len(req.block_ids)
            if min(allocated_before["context"] / context_blocks, allocated_before["generation"] / generation_blocks) > 3:
                handoffs.append((list(req.block_ids), list(taken.block_ids)))
            taken.num_done = req.num_prompt
            decoding.append(taken)
            context.free(req.block_ids[::-1])
        stalled = [req for req in decoding if not _step_decode(generation, req)]  # one token each
        if stalled and len(stalled) == len(decoding):  # the engine preempts the newest; here it leaves
            generation.free(decoding.pop().block_ids[::-1])
        for req in [r for r in decoding if r.num_done == len(r.tokens)]:
            decoding.remove(req)
            generation.free(req.block_ids[::-1])
    else:
        raise RuntimeError(f"{len(handoffs)} of {num_handoffs} hand-offs: do prompts fit both pools?")
    return handoffs[:num_handoffs]


def _step_decode(pool: BlockPool, req: _Request) -> bool:
    if not _room(pool, req, req.num_done + 1):
        return False
    req.num_done += 1
    _cache_full(pool, req)
    return True


def summarize(handoffs: list[tuple[list[int], list[int]]]) -> dict:
    descriptors = [len(coalesce_runs(remote, local)) for remote, local in handoffs]
    blocks = [len(remote) for remote, _ in handoffs]
    return {
        "handoffs": len(handoffs),
        "blocks_mean": round(statistics.mean(blocks), 1),
        "descriptors_mean": round(statistics.mean(descriptors), 2),
        "descriptors_p50": statistics.median(descriptors),
        "descriptors_p90": sorted(descriptors)[int(0.9 * (len(descriptors) - 1))],
        "descriptors_max": max(descriptors),
        "context_runs_mean": round(statistics.mean(num_runs(remote) for remote, _ in handoffs), 2),
        "generation_runs_mean": round(statistics.mean(num_runs(local) for _, local in handoffs), 2),
        "blocks_per_descriptor": round(sum(blocks) / sum(descriptors), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context-blocks", type=int, default=4096)
    parser.add_argument("--generation-blocks", type=int, default=4096)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--handoffs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args()
    handoffs = churned_handoffs(args.context_blocks, args.generation_blocks, args.prompt_tokens,
                                args.output_tokens, args.handoffs, seed=args.seed)
    summary = {**vars(args), **summarize(handoffs)}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
