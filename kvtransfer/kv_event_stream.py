"""One worker's KV-event stream in the vLLM KV-events wire format, so that Dynamo, llm-d and
Tandem's own block index read a worker exactly as they read a vLLM engine.

Owns both socket ends (the codec is kvtransfer/kv_event_wire.py). PUB frames ``[topic, seq u64 BE from 0, payload]``;
payload = msgpack ``[ts, [event, ...], data_parallel_rank]`` (always 3 elements: Dynamo rejects 2);
events as tagged maps (vLLM >= #42892, default) or tagged arrays (legacy readers); an optional
ROUTER replays the last ``buffer_size`` batches. Publisher life cycle: the constructor binds or
connects and starts one thread that owns the sockets; the engine thread calls ``sink`` per event
and ``flush`` per step; ``close`` flushes, stops the thread, releases the sockets.
"""

import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from tandem.kvtransfer.events import KVEvent
from tandem.kvtransfer.kv_event_wire import (  # noqa: F401  (re-exported: the stream's API)
    Encoding,
    EventBatch,
    KVEventDecodeError,
    decode_event_batch,
    encode_event_batch,
    kv_event_topic,
    parse_kv_event_topic,
)

logger = logging.getLogger(__name__)

_END_SEQ = (-1).to_bytes(8, "big", signed=True)  # replay terminator
_POLL_MS = 100  # the publisher thread rechecks for close() at least this often
_PUB_LINGER_MS = 200  # bounded: lets the last queued batches reach connected subscribers
_PUB_HWM = 100_000  # as vLLM; a subscriber that lags further recovers through replay


@dataclass(frozen=True, slots=True)
class ReceivedBatch:
    topic: str
    seq: int
    batch: EventBatch


def endpoint_binds(endpoint: str) -> bool:
    """vLLM's rule (bind on ``*``, ``::``, ipc, inproc; else connect, e.g. into llm-d's central SUB),
    plus ``0.0.0.0`` and port 0: neither can be connected to, so they can only mean bind."""
    if endpoint.startswith(("ipc://", "inproc://")) or "*" in endpoint or "::" in endpoint:
        return True
    host, _, port = endpoint.rpartition(":")
    return host.endswith("//0.0.0.0") or port == "0"


def _attach(socket: zmq.Socket, endpoint: str, bind: bool) -> str:
    """Bind or connect; the endpoint as bound (the real port when port 0 was asked) or as given."""
    if not bind:
        socket.connect(endpoint)
        return endpoint
    socket.bind(endpoint)
    return socket.getsockopt(zmq.LAST_ENDPOINT).decode()


class KVEventPublisher:
    """PUB (+ optional ROUTER replay) for one worker. Thread-safe; a private thread owns the sockets."""

    def __init__(
        self, endpoint: str = "tcp://*:5557", replay_endpoint: str | None = None, topic: str = "", *,
        medium: str | None = None, encoding: Encoding = "map", buffer_size: int = 10_000,
        data_parallel_rank: int | None = None,
    ) -> None:
        if encoding not in ("map", "array") or buffer_size < 0:
            raise ValueError(f"need encoding map|array and buffer_size >= 0, got {encoding!r}, {buffer_size}")
        self._topic = topic.encode()
        self._encode = functools.partial(encode_event_batch, medium=medium, encoding=encoding,
                                         data_parallel_rank=data_parallel_rank)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_size)  # (seq, payload) for replay
        self._lock = threading.Lock()  # guards _pending, _outbox, _closed and _wake_tx
        self._pending: list[KVEvent] = []
        self._outbox: deque[tuple[float, tuple[KVEvent, ...]]] = deque()
        self._closed = False
        self._num_published = 0  # written by the thread only; it is also the next seq
        self._ctx = zmq.Context()
        try:
            self._pub = self._ctx.socket(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, _PUB_HWM)
            self._endpoint = _attach(self._pub, endpoint, endpoint_binds(endpoint))
            self._replay: zmq.Socket | None = None
            self._replay_endpoint: str | None = None
            if replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.SNDHWM, 0)  # never drop part of a reply; buffer_size bounds it
                self._replay_endpoint = _attach(self._replay, replay_endpoint, bind=True)  # as vLLM
            # A wake-up pipe: lets the thread sleep in one poll on both "batch queued" and "replay asked".
            self._wake_rx = self._ctx.socket(zmq.PAIR)
            self._wake_rx.bind("inproc://wake")
            self._wake_tx = self._ctx.socket(zmq.PAIR)
            self._wake_tx.connect("inproc://wake")
        except zmq.ZMQError:
            self._ctx.destroy(linger=0)
            raise
        self._thread = threading.Thread(target=self._run, name=f"kv-events:{topic}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The PUB endpoint, with the real port when bound."""
        return self._endpoint

    @property
    def replay_endpoint(self) -> str | None:
        """The ROUTER endpoint with its real port, or None without replay."""
        return self._replay_endpoint

    @property
    def num_published(self) -> int:
        """Batches sent so far (the next batch's seq)."""
        return self._num_published

    def sink(self, event: KVEvent) -> None:
        """The :data:`KVEventSink` for ``BlockPool.subscribe``: only queues. Dropped after close()."""
        with self._lock:
            if not self._closed:
                self._pending.append(event)

    def flush(self) -> None:
        """Send the events sunk since the last flush as one batch (once per engine step); no-op if none."""
        with self._lock:
            if not self._closed and self._pending:
                self._stage_pending()
                self._wake()

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Send ``events`` as one batch, after any pending sunk events so that order is kept."""
        with self._lock:
            if self._closed:
                raise RuntimeError("KVEventPublisher is closed")
            self._stage_pending()
            self._outbox.append((time.time(), tuple(events)))
            self._wake()

    def close(self, timeout: float = 1.0) -> None:
        """Flush, let the thread send what is queued, release the sockets; returns within about
        ``timeout`` + 0.2 s (the PUB's linger for subscribers still reading). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._stage_pending()
            self._closed = True
            self._wake()
        self._thread.join(timeout)
        self._wake_tx.close(linger=0)
        if not self._thread.is_alive():
            self._ctx.term()
        else:  # not expected: no socket call in the thread blocks
            logger.warning("KV-event publisher thread still running after %.1f s", timeout)

    def _stage_pending(self) -> None:  # caller holds _lock
        if self._pending:
            self._outbox.append((time.time(), tuple(self._pending)))
            self._pending.clear()

    def _wake(self) -> None:  # caller holds _lock
        with contextlib.suppress(zmq.Again):  # a full pipe holds wake-ups already
            self._wake_tx.send(b"", zmq.NOBLOCK)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_rx, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(_POLL_MS))
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
                with self._lock:
                    batches, stop = list(self._outbox), self._closed
                    self._outbox.clear()
                for ts, events in batches:
                    self._send(ts, events)
                if self._replay is not None and self._replay in ready:
                    self._serve_replay(self._replay)
                if stop:
                    return
        finally:
            self._pub.close(linger=_PUB_LINGER_MS)
            self._wake_rx.close(linger=0)
            if self._replay is not None:
                self._replay.close(linger=0)

    def _send(self, ts: float, events: tuple[KVEvent, ...]) -> None:
        try:
            payload = self._encode(ts, events)
        except (TypeError, ValueError, OverflowError):  # a bad event must not kill the stream
            logger.exception("dropping an unencodable KV-event batch")
            return
        seq = self._num_published
        self._buffer.append((seq, payload))
        self._num_published = seq + 1  # before the send: whoever has seen seq sees it counted
        self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload])

    def _serve_replay(self, router: zmq.Socket) -> None:
        while router.poll(0):
            frames = router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                logger.warning("ignoring a malformed replay request of %d frames", len(frames))
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in self._buffer:
                if seq >= start:
                    router.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
            router.send_multipart([identity, b"", _END_SEQ, b""])


class KVEventSubscriber:
    """SUB (+ DEALER for replay) reading one publisher's batches in seq order, gaps filled by replay.
    Seq is tracked per topic (a new epoch is a new topic, so its restart at 0 is no duplicate); a batch
    older than the next expected seq is a live copy of a replayed one and is skipped."""

    def __init__(
        self, endpoint: str, replay_endpoint: str | None = None, topic: str = "", *,
        replay_timeout: float = 1.0,
    ) -> None:
        self._ctx = zmq.Context()
        try:
            self._sub = self._ctx.socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
            self._endpoint = _attach(self._sub, endpoint, endpoint_binds(endpoint))
        except zmq.ZMQError:
            self._ctx.destroy(linger=0)
            raise
        self._topic = topic
        self._replay_endpoint = replay_endpoint
        self._replay_timeout = replay_timeout
        self._dealer: zmq.Socket | None = None
        self._next_seq: dict[str, int] = {}
        self._ready: deque[ReceivedBatch] = deque()
        self.num_missed_batches = 0  # seqs neither received nor replayed (replay buffer too short)

    @property
    def endpoint(self) -> str:
        """The SUB endpoint, with the real port when bound (publishers then connect to it)."""
        return self._endpoint

    def receive(self, timeout: float) -> ReceivedBatch | None:
        """The next batch in seq order, or None if none came within ``timeout`` seconds (plus replay)."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            if not self._sub.poll(max(0, round((deadline - time.monotonic()) * 1000))):
                return None
            frames = self._sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                raise KVEventDecodeError(f"expected [topic, seq, payload] frames, got {len(frames)} frames")
            self._accept(frames[0].decode(), int.from_bytes(frames[1], "big"), frames[2])
        return self._ready.popleft()

    def catch_up(self) -> int:
        """Queue, from the replay socket, every batch of this subscriber's topic not seen yet.

        A gap is only noticed when the next batch arrives; a follower that connects after a worker
        went quiet would not learn that worker's blocks until its next event. Call this once after
        connecting (the topic must be the publisher's exact topic). Returns the batches queued."""
        if self._replay_endpoint is None:
            return 0
        expected = start = self._next_seq.get(self._topic, 0)
        for seq, payload in self._fetch_replay(expected):
            if seq >= expected:
                self._append(self._topic, expected, seq, payload)
                expected = seq + 1
        self._next_seq[self._topic] = expected
        return expected - start

    def close(self) -> None:
        self._ctx.destroy(linger=0)

    def _accept(self, topic: str, seq: int, payload: bytes) -> None:
        expected = self._next_seq.get(topic, 0)
        if seq > expected and self._replay_endpoint is not None:
            for replayed_seq, replayed in self._fetch_replay(expected):
                if replayed_seq >= expected:
                    self._append(topic, expected, replayed_seq, replayed)
                    expected = replayed_seq + 1
        if seq >= expected:
            self._append(topic, expected, seq, payload)
            expected = seq + 1
        self._next_seq[topic] = expected

    def _append(self, topic: str, expected: int, seq: int, payload: bytes) -> None:
        self._ready.append(ReceivedBatch(topic, seq, decode_event_batch(payload)))
        self.num_missed_batches += seq - expected

    def _fetch_replay(self, start: int) -> list[tuple[int, bytes]]:
        """Batches with seq >= start from the replay socket, until its terminator or the timeout."""
        if self._dealer is None:
            self._dealer = self._ctx.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.connect(self._replay_endpoint)  # type: ignore[arg-type]
        self._dealer.send_multipart([b"", start.to_bytes(8, "big")])
        deadline = time.monotonic() + self._replay_timeout
        batches: list[tuple[int, bytes]] = []
        while self._dealer.poll(max(0, round((deadline - time.monotonic()) * 1000))):
            frames = self._dealer.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                raise KVEventDecodeError(f"expected ['', seq, payload] replay frames, got {len(frames)}")
            if frames[1] == _END_SEQ:
                return batches
            batches.append((int.from_bytes(frames[1], "big"), frames[2]))
        logger.warning("KV-event replay from seq %d timed out after %.1f s", start, self._replay_timeout)
        self._dealer.close(linger=0)  # drop it: late replies must not answer the next request
        self._dealer = None
        return batches
