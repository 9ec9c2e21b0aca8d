"""Pairing names every difference between two workers' KV geometry, and none when they match."""
from dataclasses import replace

from tandem.workers.pairing import PairingInfo

HERE = PairingInfo(model="SmolLM2-135M-Instruct", block_size=16, kv_dtype="bfloat16", num_layers=30, num_kv_heads=3, head_dim=64)


def test_identical_workers_pair() -> None:
    assert HERE.mismatches(replace(HERE)) == []


def test_each_difference_is_named_with_both_values() -> None:
    there = replace(HERE, model="Llama-3.1-8B", kv_dtype="float32", block_size=32)
    assert HERE.mismatches(there) == [
        "model 'Llama-3.1-8B' there, 'SmolLM2-135M-Instruct' here",
        "block_size 32 there, 16 here",
        "kv_dtype 'float32' there, 'bfloat16' here",
    ]
