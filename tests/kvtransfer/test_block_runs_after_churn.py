"""After hours of serving, a prompt's hand-off still moves in a few runs of adjacent block ids.

Drives the real BlockPool on both sides through scripts/sim_block_runs.py (prefill chunks that
interleave, caching, tail-first frees, decode growth a block at a time). With plain LRU order and
a FIFO free list this workload needed a NIXL descriptor per 1.9 blocks.
"""
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sim_block_runs.py"


def load_sim():
    spec = importlib.util.spec_from_file_location("sim_block_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_churned_hand_off_needs_few_descriptors_and_nothing_leaks() -> None:
    sim = load_sim()
    handoffs = sim.churned_handoffs(2048, 2048, prompt_tokens=1024, output_tokens=128, num_handoffs=60)
    summary = sim.summarize(handoffs)
    assert summary["handoffs"] == 60 and 48 <= summary["blocks_mean"] <= 80
    assert summary["blocks_per_descriptor"] >= 4, summary
    for remote, local in handoffs:  # both sides hold distinct blocks, in range
        assert len(set(remote)) == len(remote) == len(local) == len(set(local))
        assert 0 <= min(remote + local) and max(remote + local) < 2048
