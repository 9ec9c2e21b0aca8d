"""The lease table: grant, acknowledge, release, expire, and refuse handles it did not issue."""
from __future__ import annotations

import pytest

from tandem.kvtransfer.leases import LeaseTable, StaleHandleError, UnknownHandleError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def table(clock: Clock) -> LeaseTable:
    return LeaseTable("ctx-0", 7, "agent-ctx-0", "10.0.0.1:50051", lease_seconds=30.0, clock=clock)


def test_a_handle_names_its_worker_epoch_blocks_and_deadline(table: LeaseTable) -> None:
    handle = table.grant("req-1", (4, 5, 9), num_tokens=40)
    assert (handle.worker_id, handle.epoch, handle.agent_name, handle.address) == ("ctx-0", 7, "agent-ctx-0", "10.0.0.1:50051")
    assert handle.block_ids == (4, 5, 9) and handle.num_tokens == 40 and handle.lease_deadline == 1030.0
    assert table.grant("req-2", (1,), 3).handle_id != handle.handle_id
    assert table.num_active == 2 and table.num_pinned_blocks == 4


def test_acknowledge_and_release_end_a_lease_once(table: LeaseTable) -> None:
    first = table.grant("req-1", (4, 5), 20)
    second = table.grant("req-2", (6,), 5)
    assert table.acknowledge(first.handle_id) == first
    assert table.acknowledge(first.handle_id) is None  # a duplicate notification
    assert table.end(second.handle_id) == second
    assert table.end(second.handle_id) is None  # already ended: not an error
    assert table.num_acknowledged == 1 and table.num_active == 0 and table.num_pinned_blocks == 0


def test_unknown_handles_are_refused_and_unknown_acks_ignored(table: LeaseTable) -> None:
    with pytest.raises(UnknownHandleError, match="no KV handle"):
        table.end("ctx-0/7/999")
    assert table.acknowledge("ctx-0/7/999") is None


def test_expiry_returns_the_blocks_of_every_lease_past_its_deadline(table: LeaseTable, clock: Clock) -> None:
    early = table.grant("req-1", (1, 2), 20)
    clock.now += 20
    late = table.grant("req-2", (3,), 5)
    assert table.expire() == []
    clock.now += 10
    assert table.expire() == [early]
    assert table.num_expired == 1 and table.num_active == 1
    assert table.end(early.handle_id) is None  # a late release of an expired lease is harmless
    clock.now += 30
    assert table.expire() == [late] and table.num_expired == 2
    assert table.end(late.handle_id) is None


def test_handles_of_another_worker_or_epoch_are_stale(table: LeaseTable) -> None:
    table.check("ctx-0", 7)
    with pytest.raises(StaleHandleError, match="epoch 6"):
        table.check("ctx-0", 6)
    with pytest.raises(StaleHandleError, match="ctx-1"):
        table.check("ctx-1", 7)


def test_handles_of_a_request_are_found_for_abort(table: LeaseTable) -> None:
    handle = table.grant("req-1", (1,), 3)
    table.grant("req-2", (2,), 3)
    assert table.handles_of_request("req-1") == [handle.handle_id]
    assert table.handles_of_request("nope") == []


def test_lease_seconds_must_be_positive(clock: Clock) -> None:
    with pytest.raises(ValueError, match="lease_seconds"):
        LeaseTable("w", 1, "a", "h:1", lease_seconds=0, clock=clock)
