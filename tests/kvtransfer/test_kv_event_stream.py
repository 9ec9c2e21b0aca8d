"""KV-event stream: PUB framing, replay, gap recovery, clean shutdown (the codec: test_kv_event_wire.py).

Real ZMQ sockets on 127.0.0.1 with ephemeral ports. PUB/SUB drops what is sent before the
subscription lands (slow joiner), so tests either publish probes until one is seen or read
history through replay; no test sleeps for a fixed time.
"""

import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgpack
import pytest
import zmq

from tandem.kvtransfer.block_hash import hash_block_tokens
from tandem.kvtransfer.block_pool import BlockPool
from tandem.kvtransfer.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from tandem.kvtransfer.kv_event_stream import (
    KVEventPublisher,
    KVEventSubscriber,
    decode_event_batch,
    encode_event_batch,
    endpoint_binds,
    kv_event_topic,
)

LOCAL = "tcp://127.0.0.1:0"
END = (-1).to_bytes(8, "big", signed=True)
T = TypeVar("T")

H0, H1 = hash_block_tokens(None, [1, 2, 3, 4]), 2**64 - 5  # a real hash and one >= 2**63
STORED = BlockStored((H0, H1), None, (1, 2, 3, 4, 5, 6, 7, 8), 4)
EVENTS: tuple[KVEvent, ...] = (STORED, BlockRemoved((H1,)), AllBlocksCleared())


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def make_publisher() -> Iterator[Callable[..., KVEventPublisher]]:
    made: list[KVEventPublisher] = []

    def make(**kwargs: Any) -> KVEventPublisher:
        made.append(KVEventPublisher(**{"endpoint": LOCAL, **kwargs}))
        return made[-1]

    yield make
    for publisher in made:
        publisher.close()


@pytest.fixture
def make_subscriber() -> Iterator[Callable[..., KVEventSubscriber]]:
    made: list[KVEventSubscriber] = []

    def make(*args: Any, **kwargs: Any) -> KVEventSubscriber:
        made.append(KVEventSubscriber(*args, **kwargs))
        return made[-1]

    yield make
    for subscriber in made:
        subscriber.close()


def wait_until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


def probe_until_seen(send: Callable[[], None], receive: Callable[[], T | None]) -> T:
    """Send probes until ``receive`` (short timeout) returns something: the subscription is live."""
    for _ in range(200):
        send()
        got = receive()
        if got is not None:
            return got
    raise AssertionError("subscriber never saw a probe")


def counting_probe(publisher: KVEventPublisher) -> tuple[Callable[[], None], list[None]]:
    """A probe sender and the list it grows: with nothing else published, probes take seqs 0..n-1."""
    sent: list[None] = []
    return lambda: (publisher.publish([]), sent.append(None))[1], sent


def raw_sub(ctx: zmq.Context, endpoint: str, topic: bytes = b"") -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    return sub


def recv_frames(sock: zmq.Socket, timeout_ms: int = 2000) -> list[bytes] | None:
    return sock.recv_multipart() if sock.poll(timeout_ms) else None


def replay(ctx: zmq.Context, endpoint: str, start: int) -> list[list[bytes]]:
    """Raw replay request; every reply up to and including the terminator."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    replies: list[list[bytes]] = []
    while not replies or replies[-1][1] != END:
        frames = recv_frames(dealer)
        assert frames is not None, "replay reply timed out"
        replies.append(frames)
    dealer.close(linger=0)
    return replies


def drive_pool(pool: BlockPool, publisher: KVEventPublisher) -> None:
    """Four engine steps, one flush each: store a 2-block prefix; free it (no event, so no batch);
    evict its tail; reset the prefix cache. Three batches."""
    blocks = pool.allocate(2)
    pool.cache_full_block(blocks[0], H0, None, [1, 2, 3, 4])
    pool.cache_full_block(blocks[1], hash_block_tokens(H0, [5, 6, 7, 8]), H0, [5, 6, 7, 8])
    publisher.flush()
    pool.free(blocks[::-1])  # tail first, so the tail is evicted first
    publisher.flush()
    pool.free(pool.allocate(1))  # evicts block 1 (BlockRemoved), frees it uncached
    publisher.flush()
    assert pool.reset_prefix_cache()
    publisher.flush()


def expected_pool_wire(medium: str | None) -> list[list[dict[str, Any]]]:
    """The three batches of drive_pool as vLLM map events."""
    h1 = hash_block_tokens(H0, [5, 6, 7, 8])

    def stored(block_hash: int, parent: int | None, tokens: list[int]) -> dict[str, Any]:
        return {"type": "BlockStored", "block_hashes": [block_hash], "parent_block_hash": parent,
                "token_ids": tokens, "block_size": 4, "lora_id": None, "medium": medium, "lora_name": None}

    return [
        [stored(H0, None, [1, 2, 3, 4]), stored(h1, H0, [5, 6, 7, 8])],
        [{"type": "BlockRemoved", "block_hashes": [h1], "medium": medium}],
        [{"type": "AllBlocksCleared"}],
    ]


@pytest.mark.parametrize(
    ("endpoint", "binds"),
    [("tcp://*:5557", True), ("tcp://[::]:5557", True), ("tcp://0.0.0.0:5557", True), (LOCAL, True),
     ("ipc:///tmp/kv", True), ("inproc://kv", True),
     ("tcp://127.0.0.1:5557", False), ("tcp://router:5557", False)],  # connect: e.g. into llm-d's central SUB
)
def test_bind_rule(endpoint: str, binds: bool) -> None:
    assert endpoint_binds(endpoint) is binds


def test_block_pool_events_reach_a_raw_subscriber(
    ctx: zmq.Context, make_publisher: Callable[..., Any]
) -> None:
    topic = kv_event_topic("w0", 1, "tiny")
    publisher = make_publisher(topic=topic, medium="GPU")
    pool = BlockPool(2, block_size=4)
    pool.subscribe(publisher.sink)
    sub = raw_sub(ctx, publisher.endpoint, b"kv@")
    assert publisher.endpoint.startswith("tcp://127.0.0.1:") and not publisher.endpoint.endswith(":0")
    send_probe, probes = counting_probe(publisher)
    last = int.from_bytes(probe_until_seen(send_probe, lambda: recv_frames(sub, 20))[1], "big")
    num_probes = len(probes)
    while last < num_probes - 1:  # late probes
        last = int.from_bytes(recv_frames(sub)[1], "big")  # type: ignore[index]
    drive_pool(pool, publisher)
    received = [recv_frames(sub) for _ in range(3)]
    assert all(f is not None and len(f) == 3 and f[0] == topic.encode() for f in received)
    assert [int.from_bytes(f[1], "big") for f in received] == [num_probes, num_probes + 1, num_probes + 2]
    assert all(len(f[1]) == 8 for f in received)
    raw = [msgpack.unpackb(f[2]) for f in received]
    assert all(len(batch) == 3 and isinstance(batch[0], float) and batch[2] is None for batch in raw)
    assert [batch[1] for batch in raw] == expected_pool_wire("GPU")
    assert all(0 <= h < 2**64 for batch in raw for event in batch[1] for h in event.get("block_hashes", []))
    assert recv_frames(sub, 50) is None  # the empty flush sent nothing


def test_pub_frames_byte_for_byte(ctx: zmq.Context, make_publisher: Callable[..., Any]) -> None:
    """The codec's bytes (golden: test_kv_event_wire.py) for the publisher's settings, behind the
    topic and the seq as 8 bytes big-endian counting batches from 0 (probes are batches 0..n-1)."""
    topic = kv_event_topic("w0", 0, "tiny")
    publisher = make_publisher(topic=topic, medium="GPU", encoding="array", data_parallel_rank=0)
    sub = raw_sub(ctx, publisher.endpoint)
    send_probe, probes = counting_probe(publisher)
    probe_until_seen(send_probe, lambda: recv_frames(sub, 20))
    seq = len(probes).to_bytes(8, "big")
    publisher.publish(EVENTS)
    while (frames := recv_frames(sub)) is not None and frames[1] != seq:
        pass  # late probes
    assert frames is not None
    (ts,) = struct.unpack(">d", frames[2][2:10])  # after fixarray(3) and the float64 marker
    payload = encode_event_batch(ts, EVENTS, medium="GPU", encoding="array", data_parallel_rank=0)
    assert frames == [topic.encode(), seq, payload] and abs(ts - time.time()) < 60


def test_replay_serves_every_buffered_batch(ctx: zmq.Context, make_publisher: Callable[..., Any]) -> None:
    publisher = make_publisher(replay_endpoint=LOCAL, encoding="array")
    pool = BlockPool(2, block_size=4)
    pool.subscribe(publisher.sink)
    drive_pool(pool, publisher)  # nobody listens: live frames are lost, replay has them
    wait_until(lambda: publisher.num_published == 3)
    replies = replay(ctx, publisher.replay_endpoint, 0)
    assert [r[0] for r in replies] == [b""] * 4 and replies[-1] == [b"", END, b""]
    assert [int.from_bytes(r[1], "big") for r in replies[:-1]] == [0, 1, 2]
    tags = [msgpack.unpackb(r[2])[1][0][0] for r in replies[:-1]]  # array encoding: tag first
    assert tags == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert decode_event_batch(replies[0][2]).events[1].parent_block_hash == H0  # type: ignore[union-attr]
    assert [int.from_bytes(r[1], "big") for r in replay(ctx, publisher.replay_endpoint, 2)[:-1]] == [2]
    assert replay(ctx, publisher.replay_endpoint, 3) == [[b"", END, b""]]


def test_replay_keeps_only_buffer_size_batches(ctx: zmq.Context, make_publisher: Callable[..., Any]) -> None:
    publisher = make_publisher(replay_endpoint=LOCAL, buffer_size=2)
    for _ in range(4):
        publisher.publish([AllBlocksCleared()])
    wait_until(lambda: publisher.num_published == 4)
    assert [int.from_bytes(r[1], "big") for r in replay(ctx, publisher.replay_endpoint, 0)[:-1]] == [2, 3]


def test_late_subscriber_recovers_history_through_replay(
    make_publisher: Callable[..., Any], make_subscriber: Callable[..., Any]
) -> None:
    topic = kv_event_topic("w0", 0, "tiny")
    publisher = make_publisher(replay_endpoint=LOCAL, topic=topic)
    pool = BlockPool(2, block_size=4)
    pool.subscribe(publisher.sink)
    drive_pool(pool, publisher)
    wait_until(lambda: publisher.num_published == 3)  # all sent before anyone listens
    subscriber = make_subscriber(publisher.endpoint, publisher.replay_endpoint, "kv@w0#0@")
    send_probe, probes = counting_probe(publisher)
    first = probe_until_seen(send_probe, lambda: subscriber.receive(0.02))
    batches = [first] + [subscriber.receive(2.0) for _ in range(3 + len(probes) - 1)]
    assert [b.seq for b in batches] == list(range(len(batches)))  # type: ignore[union-attr]
    assert {b.topic for b in batches} == {topic}  # type: ignore[union-attr]
    h1 = hash_block_tokens(H0, [5, 6, 7, 8])
    assert [b.batch.events for b in batches[:3]] == [  # type: ignore[union-attr]
        (BlockStored((H0,), None, (1, 2, 3, 4), 4), BlockStored((h1,), H0, (5, 6, 7, 8), 4)),
        (BlockRemoved((h1,)),),
        (AllBlocksCleared(),),
    ]
    assert subscriber.num_missed_batches == 0


def test_subscriber_fills_a_dropped_batch(
    ctx: zmq.Context, make_publisher: Callable[..., Any], make_subscriber: Callable[..., Any]
) -> None:
    # The replay side is a real publisher; the live side is a raw PUB that skips seq 1 on purpose.
    publisher = make_publisher(replay_endpoint=LOCAL)
    batches = [[BlockStored((i + 1,), i or None, (i, i), 2)] for i in range(3)]
    for events in batches:
        publisher.publish(events)
    wait_until(lambda: publisher.num_published == 3)
    live = ctx.socket(zmq.PUB)
    live.bind(LOCAL)
    subscriber = make_subscriber(live.getsockopt(zmq.LAST_ENDPOINT).decode(), publisher.replay_endpoint)

    def send(seq: int) -> None:
        live.send_multipart([b"t", seq.to_bytes(8, "big"), encode_event_batch(0, batches[seq], medium=None)])

    # seq 0 is the probe; copies that arrive late are duplicates the subscriber skips
    assert probe_until_seen(lambda: send(0), lambda: subscriber.receive(0.02)).seq == 0
    send(2)
    received = [subscriber.receive(2.0), subscriber.receive(2.0)]
    assert [(r.seq, r.batch.events) for r in received] == [(1, tuple(batches[1])), (2, tuple(batches[2]))]
    assert subscriber.receive(0.05) is None and subscriber.num_missed_batches == 0


def test_subscriber_without_replay_counts_missed(
    ctx: zmq.Context, make_publisher: Callable[..., Any], make_subscriber: Callable[..., Any]
) -> None:
    publisher = make_publisher()
    publisher.publish([AllBlocksCleared()])
    publisher.publish([AllBlocksCleared()])
    wait_until(lambda: publisher.num_published == 2)
    subscriber = make_subscriber(publisher.endpoint)
    first = probe_until_seen(lambda: publisher.publish([]), lambda: subscriber.receive(0.02))
    assert first.seq >= 1 and subscriber.num_missed_batches == first.seq  # seq 0 was out before we joined


def test_connect_mode_pushes_into_a_bound_subscriber(
    make_publisher: Callable[..., Any], make_subscriber: Callable[..., Any]
) -> None:
    subscriber = make_subscriber(LOCAL)
    assert not endpoint_binds(subscriber.endpoint)
    publisher = make_publisher(endpoint=subscriber.endpoint, data_parallel_rank=3)
    assert publisher.endpoint == subscriber.endpoint
    first = probe_until_seen(lambda: publisher.publish([]), lambda: subscriber.receive(0.02))
    assert first.batch.data_parallel_rank == 3 and first.batch.events == ()


def test_close_flushes_pending_and_stops_thread(
    make_publisher: Callable[..., Any], make_subscriber: Callable[..., Any]
) -> None:
    publisher = make_publisher(replay_endpoint=LOCAL)
    subscriber = make_subscriber(publisher.endpoint)
    send_probe, probes = counting_probe(publisher)
    probe_until_seen(send_probe, lambda: subscriber.receive(0.02))
    num_probes = len(probes)
    publisher.sink(STORED)  # no flush: close() must send it
    threads_before = threading.active_count()
    start = time.monotonic()
    publisher.close()
    assert time.monotonic() - start < 1.0
    assert threading.active_count() == threads_before - 1
    assert publisher.num_published == num_probes + 1
    while (got := subscriber.receive(2.0)) is not None and got.seq < num_probes:
        pass
    assert got is not None and got.batch.events == (STORED,)
    publisher.sink(STORED)  # engine-thread calls after close are dropped, not raised
    publisher.flush()
    publisher.close()  # idempotent
    with pytest.raises(RuntimeError):
        publisher.publish([AllBlocksCleared()])


def test_close_is_prompt_with_no_peer(make_publisher: Callable[..., Any]) -> None:
    publisher = make_publisher(endpoint="tcp://127.0.0.1:1", replay_endpoint=LOCAL)  # connects to nobody
    publisher.publish([STORED])
    start = time.monotonic()
    publisher.close()
    assert time.monotonic() - start < 1.0


def test_concurrent_sinks_lose_nothing(ctx: zmq.Context, make_publisher: Callable[..., Any]) -> None:
    publisher = make_publisher(replay_endpoint=LOCAL)

    def engine(thread: int) -> None:
        for i in range(50):
            publisher.sink(BlockRemoved((thread * 1000 + i,)))
            if i % 3 == 0:
                publisher.flush()
        publisher.flush()

    threads = [threading.Thread(target=engine, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    publisher.publish([])  # the only empty batch, and the last: once it is out, all are
    replies: list[list[bytes]] = []

    def last_is_out() -> bool:
        replies[:] = replay(ctx, publisher.replay_endpoint, 0)[:-1]
        return bool(replies) and decode_event_batch(replies[-1][2]).events == ()

    wait_until(last_is_out)
    assert [int.from_bytes(r[1], "big") for r in replies] == list(range(len(replies)))
    events = [e for r in replies for e in decode_event_batch(r[2]).events]
    hashes = [e.block_hashes[0] for e in events if isinstance(e, BlockRemoved)]
    assert len(hashes) == len(events)
    assert sorted(hashes) == sorted(t * 1000 + i for t in range(4) for i in range(50))
    for t in range(4):  # each thread's events stay in its own order
        assert [h for h in hashes if h // 1000 == t] == [t * 1000 + i for i in range(50)]
