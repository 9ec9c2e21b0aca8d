"""Tandem's KV-event stream as NVIDIA Dynamo 1.6.1 reads it: a real engine's block pool publishes
through KVEventPublisher, Dynamo's standalone indexer (a subprocess) subscribes, and its /query
scores (in tokens) must follow stores, chained stores, evictions, clears and a replayed gap.
Dynamo's router-side block hash must equal what a consumer computes from the events' token ids.

Block size 4, tiny random-weight Llama, one sampled token per request (max_tokens=1), so a
request caches exactly the full blocks of its prompt. The wire's golden bytes are in
tests/kvtransfer/test_kv_event_wire.py (they need no Dynamo).
"""
from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
import xxhash
import zmq

pytest.importorskip("dynamo.llm")

from dynamo.llm import compute_block_hash_for_seq  # noqa: E402
from standalone_indexer import StandaloneIndexer  # noqa: E402

from tandem.kvtransfer.block_hash import hash_full_blocks  # noqa: E402
from tandem.kvtransfer.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent  # noqa: E402
from tandem.kvtransfer.kv_event_stream import KVEventPublisher, kv_event_topic  # noqa: E402
from tandem.kvtransfer.kv_event_wire import Encoding, decode_event_batch, encode_event_batch  # noqa: E402
from tandem.models.loader import LoadedModel, load_model  # noqa: E402
from tandem.workers.config import CacheConfig, EngineConfig  # noqa: E402
from tandem.workers.engine import LLMEngine  # noqa: E402
from tandem.workers.kv_cache_sizing import kv_cache_spec  # noqa: E402
from tandem.workers.sampling_params import SamplingParams  # noqa: E402

BLOCK = 4
LOCAL = "tcp://127.0.0.1:0"
DYNAMO_SEED = 1337  # Dynamo's XXH3 seed for its local block hashes
CPU = torch.device("cpu")

A = tuple(range(10, 26))  # 16 tokens: 4 blocks
B = tuple(range(40, 60))  # 20 tokens: 5 blocks
C = tuple(range(70, 90))


class Worker:
    """What workers/worker.py wires up: an engine whose pool feeds a publisher, flushed per step."""

    def __init__(self, engine: LLMEngine, publisher: KVEventPublisher) -> None:
        self.engine, self.publisher = engine, publisher
        self.events: list[KVEvent] = []  # what the pool emitted, for assertions on the stream's input
        engine.pool.subscribe(publisher.sink)
        engine.pool.subscribe(self.events.append)

    def start(self) -> None:
        self.publisher.publish([AllBlocksCleared()])  # as Worker.start(): a fresh epoch starts empty

    def run(self, *prompts: Sequence[int]) -> None:
        """Serve the prompts together (one sampled token each), flushing after every step."""
        for prompt in prompts:
            self.engine.add_request(uuid.uuid4().hex, list(prompt), SamplingParams(max_tokens=1))
        while self.engine.has_unfinished_requests():
            self.engine.step()
            self.publisher.flush()

    def heartbeat(self) -> None:
        self.publisher.publish([])


MakeWorker = Callable[..., Worker]  # (num_blocks=64, encoding="map") -> Worker


@pytest.fixture(scope="module")
def loaded(tiny_llama) -> LoadedModel:
    return load_model(tiny_llama[0], dtype=torch.float32, device=CPU, show_progress=False)


@pytest.fixture
def indexer(tmp_path: Path) -> Iterator[StandaloneIndexer]:
    process = StandaloneIndexer(tmp_path)
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture
def make_worker(loaded: LoadedModel) -> Iterator[MakeWorker]:
    publishers: list[KVEventPublisher] = []

    def make(num_blocks: int = 64, encoding: Encoding = "map") -> Worker:
        bytes_per_block = kv_cache_spec(loaded.config, BLOCK, torch.float32).bytes_per_block
        config = EngineConfig(cache=CacheConfig(block_size=BLOCK, num_bytes=num_blocks * bytes_per_block),
                              show_progress=False)
        engine = LLMEngine(loaded, config, CPU)
        assert engine.pool.num_blocks == num_blocks
        topic = kv_event_topic(f"w{len(publishers)}", 0, "tiny")
        publishers.append(KVEventPublisher(LOCAL, LOCAL, topic, medium="GPU", encoding=encoding))
        return Worker(engine, publishers[-1])

    yield make
    for publisher in publishers:
        publisher.close()


def register(indexer: StandaloneIndexer, worker: Worker, instance_id: int = 1) -> None:
    publisher = worker.publisher
    indexer.register(instance_id, publisher.endpoint, publisher.replay_endpoint, BLOCK)


def stored(events: Sequence[KVEvent]) -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored)]


def removed(events: Sequence[KVEvent]) -> list[BlockRemoved]:
    return [e for e in events if isinstance(e, BlockRemoved)]


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_stored_and_chained_blocks(indexer: StandaloneIndexer, make_worker: MakeWorker, encoding: Encoding) -> None:
    worker = make_worker(encoding=encoding)
    register(indexer, worker)
    worker.start()
    prefix = A[:10]  # 2 full blocks; the 2-token tail is never stored
    worker.run(prefix)
    indexer.wait_for({prefix: {1: 8}, A: {1: 8}, B: {}}, worker.heartbeat)
    first, mark = stored(worker.events), len(worker.events)
    worker.run(A)  # hits the 2 cached blocks, stores blocks 3 and 4 chained onto them
    chained = stored(worker.events[mark:])
    assert [e.parent_block_hash for e in chained] == [first[-1].block_hashes[0], chained[0].block_hashes[0]]
    indexer.wait_for({A: {1: 16}, prefix: {1: 8}, A[:4] + B: {1: 4}, B: {}}, worker.heartbeat)


def test_eviction_lowers_the_evicted_prefix(indexer: StandaloneIndexer, make_worker: MakeWorker) -> None:
    worker = make_worker(num_blocks=8)
    register(indexer, worker)
    worker.start()
    worker.run(A)  # 4 of 8 blocks, cached and evictable once the request ends
    indexer.wait_for({A: {1: 16}}, worker.heartbeat)
    a_hashes, b_hashes = hash_full_blocks(A, BLOCK), hash_full_blocks(B, BLOCK)
    worker.run(B)  # 5 blocks: the 4 free ones and A's least recently freed block, its tail
    assert removed(worker.events) == [BlockRemoved((a_hashes[3],))]
    indexer.wait_for({A: {1: 12}, B: {1: 20}}, worker.heartbeat)
    worker.run(C)  # 5 more: the rest of A (tail first), then B's last two blocks
    assert removed(worker.events)[1:] == [BlockRemoved((*a_hashes[2::-1], b_hashes[4], b_hashes[3]))]
    indexer.wait_for({A: {}, B: {1: 12}, C: {1: 20}}, worker.heartbeat)


def test_clear_forgets_then_restored_blocks_count_again(indexer: StandaloneIndexer, make_worker: MakeWorker) -> None:
    worker = make_worker()
    register(indexer, worker)
    worker.start()
    worker.run(A, B)
    indexer.wait_for({A: {1: 16}, B: {1: 20}}, worker.heartbeat)
    assert worker.engine.pool.reset_prefix_cache()  # the pool's own AllBlocksCleared
    worker.publisher.flush()
    indexer.wait_for({A: {}, B: {}}, worker.heartbeat)
    worker.run(A)  # the same block hashes again, accepted after the clear
    indexer.wait_for({A: {1: 16}, B: {}}, worker.heartbeat)
    worker.start()  # a restarted worker's first batch
    indexer.wait_for({A: {}}, worker.heartbeat)


def test_replay_recovers_batches_sent_before_registration(indexer: StandaloneIndexer, make_worker: MakeWorker) -> None:
    worker = make_worker()
    worker.start()
    worker.run(A)  # nobody subscribed: PUB drops these; only the replay buffer has them
    indexer.wait_until(lambda: worker.publisher.num_published, 2)  # the clear and A's blocks are out
    register(indexer, worker)
    worker.run(B)  # seq 2 reveals the gap; the indexer replays from seq 0
    indexer.wait_for({A: {1: 16}, B: {1: 20}}, worker.heartbeat)
    log = indexer.log()
    assert "Gap detected: expected seq 0" in log and "Replay complete" in log


def test_only_the_gpu_medium_counts_as_device_blocks(indexer: StandaloneIndexer, make_worker: MakeWorker) -> None:
    """Dynamo maps ``medium`` to a storage tier: "GPU" is the device tier, which /query scores and
    the KV router weighs; "CPU" is host offload, counted only in the per-tier totals. vLLM's
    BlockPool says "GPU" for its primary pool on every platform."""
    worker = make_worker()
    host = KVEventPublisher(LOCAL, LOCAL, kv_event_topic("host", 0, "tiny"), medium="CPU")
    try:
        worker.engine.pool.subscribe(host.sink)
        register(indexer, worker, instance_id=1)
        indexer.register(2, host.endpoint, host.replay_endpoint, BLOCK)
        worker.run(A)
        host.flush()

        def tiers() -> dict[str, tuple[int, int]]:
            return {i: (n["gpu"], n["cpu"]) for i, n in indexer.query(A)["instances"].items()}

        indexer.wait_until(tiers, {"1": (16, 16), "2": (0, 16)}, lambda: (worker.heartbeat(), host.publish([])))
        assert indexer.scores(A) == {1: 16}
    finally:
        host.close()


def dynamo_consumer_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """What a consumer of the wire computes per block: XXH3-64, seed 1337, u32 LE token ids."""
    chunks = [token_ids[i : i + block_size] for i in range(0, len(token_ids), block_size)]
    return [xxhash.xxh3_64_intdigest(struct.pack(f"<{len(c)}I", *c), seed=DYNAMO_SEED) for c in chunks]


def replayed_payloads(publisher: KVEventPublisher) -> list[bytes]:
    """Every batch the publisher sent, as bytes, from its replay socket (seq 0 on)."""
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(publisher.replay_endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        payloads: list[bytes] = []
        while dealer.poll(5000):
            _, seq, payload = dealer.recv_multipart()
            if seq == (-1).to_bytes(8, "big", signed=True):
                return payloads
            payloads.append(payload)
        raise AssertionError("replay did not finish")
    finally:
        ctx.destroy(linger=0)


def test_dynamo_block_hash_equals_the_consumer_hash_of_tandem_events(
    indexer: StandaloneIndexer, make_worker: MakeWorker
) -> None:
    worker = make_worker()
    register(indexer, worker)
    worker.run(A[:10], A, B)  # in one batch; A[:10] and A share 2 blocks, stored once
    indexer.wait_for({A: {1: 16}, B: {1: 20}}, worker.heartbeat)
    events = [e for p in replayed_payloads(worker.publisher) for e in decode_event_batch(p).events]
    assert events == worker.events  # the wire carried exactly what the pool emitted
    consumer = {h: t for e in stored(events)
                for h, t in zip(e.block_hashes, dynamo_consumer_hashes(e.token_ids, e.block_size))}
    assert len(consumer) == 4 + 5
    assert [consumer[h] for h in hash_full_blocks(A, BLOCK)] == compute_block_hash_for_seq(list(A), BLOCK)
    assert [consumer[h] for h in hash_full_blocks(B, BLOCK)] == compute_block_hash_for_seq(list(B), BLOCK)
    indexed = {block["block_hash"]: block["tokens_hash"]  # what the indexer computed from the events
               for event in indexer.dump() for block in event["event"]["data"]["stored"]["blocks"]}
    assert indexed == consumer


def test_dynamo_block_hash_of_wide_token_ids_through_the_codec() -> None:
    """Token ids past u16 and up to u32 max (the tiny model's vocabulary is 160)."""
    tokens = (0, 1, 2**16, 2**32 - 1, 7, 2**31, 65535, 123456789)
    payload = encode_event_batch(0.0, [BlockStored((2**64 - 1, 5), 2**63, tokens, 4)], medium="GPU")
    (event,) = decode_event_batch(payload).events
    assert isinstance(event, BlockStored)
    assert dynamo_consumer_hashes(event.token_ids, event.block_size) == compute_block_hash_for_seq(list(tokens), 4)
