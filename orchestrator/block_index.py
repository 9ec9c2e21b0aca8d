"""The cluster-wide KV block index: which worker holds which prefix blocks, for KV-aware routing.

Owns two things. :class:`BlockIndex` is a pure, thread-safe map ``worker -> (epoch, block hashes)``
fed by KV events; the router asks it how many leading blocks of a prompt each worker holds.
:class:`KVEventFollower` reads every worker's KV-event stream (vLLM wire format over ZMQ) on one
background thread and feeds the index.

Epochs fence restarts: an entry, and every batch applied to it, carries the worker's epoch (parsed
from the batch's topic, never assumed from the subscription), so events of a dead incarnation
can never land on its successor. Hashes are those of :mod:`tandem.kvtransfer.block_hash`, the
same function the workers use, so a prompt tokenized once here matches their blocks exactly.

Life cycle of the follower: ``follow`` registers the worker's epoch in the index at once and hands
a new subscriber to the thread; ``unfollow`` drops the worker at once and has the thread close its
subscriber; ``close`` stops the thread, which closes every subscriber. No torch here.
"""

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zmq

from tandem.kvtransfer.block_hash import BlockHash, hash_full_blocks
from tandem.kvtransfer.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from tandem.kvtransfer.kv_event_stream import KVEventDecodeError, KVEventSubscriber, parse_kv_event_topic

logger = logging.getLogger(__name__)

_MAX_BATCHES_PER_TURN = 64  # per subscriber and turn: one busy worker cannot starve the others


class StaleEpochError(ValueError):
    """A worker was registered with an epoch older than the one the index already follows."""

    def __init__(self, worker_id: str, epoch: int, current_epoch: int) -> None:
        super().__init__(f"worker {worker_id!r} epoch {epoch} is older than its current epoch {current_epoch}")
        self.worker_id = worker_id
        self.epoch = epoch
        self.current_epoch = current_epoch


@dataclass(slots=True)
class _Entry:
    epoch: int
    hashes: set[BlockHash] = field(default_factory=set)


class BlockIndex:
    """Which worker holds which KV blocks, from the workers' KV-event streams. Thread-safe.

    One lock guards everything; each call holds it for O(events) or O(workers x prompt blocks).
    """

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def add_worker(self, worker_id: str, epoch: int) -> None:
        """Register a worker's epoch. A newer epoch replaces the old one and drops its entries (the
        restarted worker's cache is empty); the same epoch is a no-op; an older one raises
        :class:`StaleEpochError`, so a late discovery message cannot roll a worker back."""
        with self._lock:
            entry = self._entries.get(worker_id)
            if entry is not None and epoch < entry.epoch:
                raise StaleEpochError(worker_id, epoch, entry.epoch)
            if entry is None or epoch > entry.epoch:
                self._entries[worker_id] = _Entry(epoch)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a dead or departed worker: all its entries go at once. Unknown ids are ignored."""
        with self._lock:
            self._entries.pop(worker_id, None)

    def apply(self, worker_id: str, epoch: int, events: Sequence[KVEvent]) -> bool:
        """Apply one batch in order; False (nothing changed) unless ``epoch`` is the worker's
        registered epoch: an unknown worker's or another incarnation's events must not land."""
        with self._lock:
            entry = self._entries.get(worker_id)
            if entry is None or entry.epoch != epoch:
                return False
            for event in events:
                if isinstance(event, BlockStored):
                    if event.block_size == self.block_size:
                        entry.hashes.update(event.block_hashes)
                    else:  # hashed over other block boundaries: they could never match a prompt here
                        logger.warning("worker %s stores blocks of %d tokens, the index uses %d; ignored",
                                       worker_id, event.block_size, self.block_size)
                elif isinstance(event, BlockRemoved):
                    entry.hashes.difference_update(event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    entry.hashes.clear()
            return True

    def cached_prefix_blocks(self, token_ids: Sequence[int]) -> dict[str, int]:
        """For every known worker, how many leading full blocks of the prompt it holds (0 included).

        Hashes are chained, so a hit on block i means the worker holds blocks 0..i exactly; but
        only a consecutive run from block 0 is usable, so each walk stops at the first miss.
        """
        prompt = hash_full_blocks(token_ids, self.block_size)  # outside the lock: the costly part
        with self._lock:
            counts: dict[str, int] = {}
            for worker_id, entry in self._entries.items():
                n = 0
                while n < len(prompt) and prompt[n] in entry.hashes:
                    n += 1
                counts[worker_id] = n
            return counts

    def num_blocks(self, worker_id: str) -> int:
        """Blocks the worker holds now (0 for an unknown worker)."""
        with self._lock:
            entry = self._entries.get(worker_id)
            return 0 if entry is None else len(entry.hashes)

    def workers(self) -> list[tuple[str, int]]:
        """(worker_id, epoch) of every registered worker, sorted by id."""
        with self._lock:
            return sorted((worker_id, entry.epoch) for worker_id, entry in self._entries.items())


class KVEventFollower:
    """Follows several workers' ZMQ KV-event streams on one background thread and feeds a BlockIndex.

    Threading: ZMQ sockets are not thread-safe, so a subscriber belongs to the follower thread
    from the moment ``follow`` hands it over through the locked command queue (which is the memory
    barrier ZMQ asks for when a socket changes threads). Callers only touch the index and the queue.
    The thread polls each subscriber without blocking in turn, then sleeps up to ``poll_timeout``
    on a wake-up event: so the delivery latency is at most ``poll_timeout``, and a gap repair may
    hold the thread for the subscriber's replay timeout (1 s) when a publisher is gone.
    """

    def __init__(self, index: BlockIndex, poll_timeout: float = 0.05) -> None:
        if poll_timeout <= 0:
            raise ValueError(f"poll_timeout must be > 0, got {poll_timeout}")
        self.index = index
        self._poll_timeout = poll_timeout
        self._lock = threading.Lock()  # guards _commands and _closed
        self._commands: deque[tuple[str, KVEventSubscriber | None]] = deque()
        self._closed = False
        self._wake = threading.Event()
        self._subscribers: dict[str, KVEventSubscriber] = {}  # the follower thread's only
        self._num_applied = 0  # written by the follower thread only
        self._num_ignored = 0
        self._thread = threading.Thread(target=self._run, name="kv-event-follower", daemon=True)
        self._thread.start()

    @property
    def num_batches_applied(self) -> int:
        """Batches the index accepted."""
        return self._num_applied

    @property
    def num_batches_ignored(self) -> int:
        """Batches dropped: stale epoch, unknown worker, bad topic or undecodable payload."""
        return self._num_ignored

    def follow(self, worker_id: str, epoch: int, endpoint: str, replay_endpoint: str | None, topic: str) -> None:
        """Start following a worker's stream (the endpoints and topic of its ready line). Following
        it again with a newer epoch drops the old entries now and replaces the old subscription.
        Raises ValueError if the topic does not name this worker and epoch, StaleEpochError for an
        older epoch, zmq.ZMQError for a bad endpoint; nothing changes then."""
        named_id, named_epoch, _ = parse_kv_event_topic(topic)
        if (named_id, named_epoch) != (worker_id, epoch):
            raise ValueError(f"topic {topic!r} is not worker {worker_id!r} epoch {epoch}")
        subscriber = KVEventSubscriber(endpoint, replay_endpoint, topic)  # errors surface here, to the caller
        try:
            self._send(worker_id, subscriber, lambda: self.index.add_worker(worker_id, epoch))
        except BaseException:
            subscriber.close()
            raise

    def unfollow(self, worker_id: str) -> None:
        """Stop following a worker: its entries leave the index now, its subscriber closes soon."""
        self._send(worker_id, None, lambda: self.index.remove_worker(worker_id))

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and close every subscriber; returns within about ``timeout``. Idempotent."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # only while a replay from a dead publisher is timing out
            logger.warning("KV-event follower thread still running after %.1f s", timeout)

    def _send(self, worker_id: str, subscriber: KVEventSubscriber | None, update: Callable[[], None]) -> None:
        """Update the index and queue the command under one lock, so that concurrent follow/unfollow
        calls leave the index and the thread's subscribers in the same order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("KVEventFollower is closed")
            update()
            self._commands.append((worker_id, subscriber))
        self._wake.set()

    def _run(self) -> None:
        try:
            while self._take_commands():
                received = sum(self._drain(subscriber) for subscriber in list(self._subscribers.values()))
                if not received:
                    self._wake.wait(self._poll_timeout)
                    self._wake.clear()  # before the next _take_commands: no command is missed
        finally:
            with self._lock:
                late = [subscriber for _, subscriber in self._commands if subscriber is not None]
                self._commands.clear()
            for subscriber in [*self._subscribers.values(), *late]:
                subscriber.close()
            self._subscribers.clear()

    def _take_commands(self) -> bool:
        """Install or drop subscribers as asked, in order; False once closed."""
        with self._lock:
            commands, closed = list(self._commands), self._closed
            self._commands.clear()
        for worker_id, subscriber in commands:
            old = self._subscribers.pop(worker_id, None)
            if old is not None:
                old.close()
            if subscriber is not None:
                self._subscribers[worker_id] = subscriber
                self._catch_up(subscriber)
        return not closed

    def _catch_up(self, subscriber: KVEventSubscriber) -> None:
        """Learn what the worker published before we connected, even if it is quiet now."""
        try:
            subscriber.catch_up()
        except (KVEventDecodeError, zmq.ZMQError) as e:
            logger.warning("KV-event catch-up failed (the next gap repairs it): %s", e)

    def _drain(self, subscriber: KVEventSubscriber) -> int:
        """Apply up to _MAX_BATCHES_PER_TURN ready batches; the number read."""
        for n in range(_MAX_BATCHES_PER_TURN):
            try:
                received = subscriber.receive(0)
                if received is None:
                    return n
                worker_id, epoch, _ = parse_kv_event_topic(received.topic)
            except (KVEventDecodeError, ValueError, zmq.ZMQError) as e:  # bad frame or topic: keep the stream
                logger.warning("dropping a KV-event batch: %s", e)
                self._num_ignored += 1
                continue
            if self.index.apply(worker_id, epoch, received.batch.events):
                self._num_applied += 1
            else:
                self._num_ignored += 1
        return _MAX_BATCHES_PER_TURN
