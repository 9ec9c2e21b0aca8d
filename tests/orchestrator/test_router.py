"""Routing policies on crafted loads: each policy's choice, prefix awareness, local prefill, health."""
from __future__ import annotations

import pytest

from tandem.orchestrator.router import (
    KVAwareRouter,
    LeastLoadRouter,
    RoundRobinRouter,
    Route,
    RoutingError,
    WorkerLoad,
    make_router,
)

BLOCK = 16


def load(
    worker_id: str,
    role: str,
    free: int = 100,
    total: int = 100,
    running: int = 0,
    waiting: int = 0,
    queued: int = 0,
    healthy: bool = True,
) -> WorkerLoad:
    return WorkerLoad(worker_id, role, free, total, running, waiting, queued, healthy)  # type: ignore[arg-type]


def cluster(**overrides: WorkerLoad) -> list[WorkerLoad]:
    workers = {"c0": load("c0", "context"), "c1": load("c1", "context"),
               "g0": load("g0", "generation"), "g1": load("g1", "generation")}
    return list({**workers, **overrides}.values())


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "kv_aware"])
def test_every_policy_returns_a_context_and_a_generation_worker(policy: str) -> None:
    route = make_router(policy, local_prefill_max_tokens=64).route(200, {}, cluster(), BLOCK)
    assert route.context_worker in {"c0", "c1"} and route.generation_worker in {"g0", "g1"}
    assert route.reason == "disaggregated" and route.cached_tokens_on_context == route.cached_tokens_on_generation == 0


def test_make_router_refuses_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="'fastest'"):
        make_router("fastest", 64)


def test_round_robin_rotates_each_role_by_worker_id() -> None:
    router = RoundRobinRouter()
    routes = [router.route(200, {}, cluster(), BLOCK) for _ in range(4)]
    assert [(r.context_worker, r.generation_worker) for r in routes] == [("c0", "g0"), ("c1", "g1")] * 2


def test_round_robin_skips_unhealthy_workers_and_keeps_its_place_when_one_joins() -> None:
    router = RoundRobinRouter()
    down = cluster(g1=load("g1", "generation", healthy=False))
    assert [router.route(200, {}, down, BLOCK).generation_worker for _ in range(2)] == ["g0", "g0"]
    grown = cluster() + [load("g2", "generation")]
    assert [router.route(200, {}, grown, BLOCK).generation_worker for _ in range(3)] == ["g1", "g2", "g0"]


def test_least_load_prefers_short_prefill_queues_and_free_blocks() -> None:
    workers = cluster(
        c0=load("c0", "context", queued=500),
        c1=load("c1", "context", queued=100, waiting=3),
        g0=load("g0", "generation", free=40, running=1),
        g1=load("g1", "generation", free=60, running=9),
    )
    route = LeastLoadRouter().route(200, {"g0": 12}, workers, BLOCK)  # blind to the cache
    assert (route.context_worker, route.generation_worker) == ("c1", "g1")
    tied = cluster(g0=load("g0", "generation", free=60, running=2), g1=load("g1", "generation", free=60, running=1))
    assert LeastLoadRouter().route(200, {}, tied, BLOCK).generation_worker == "g1"
    assert LeastLoadRouter().route(200, {}, cluster(), BLOCK) == Route("c0", "g0", 0, 0, "disaggregated")


def test_kv_aware_picks_the_context_worker_that_holds_the_prefix() -> None:
    # c1 holds 10 of the prompt's 13 blocks: 40 uncached tokens + 50 queued beats 200 uncached on c0
    workers = cluster(c1=load("c1", "context", queued=50))
    route = KVAwareRouter().route(200, {"c1": 10}, workers, BLOCK)
    assert route.context_worker == "c1" and route.cached_tokens_on_context == 160
    # ...unless its queue costs more than the prefix saves
    busy = cluster(c1=load("c1", "context", queued=161))
    assert KVAwareRouter().route(200, {"c1": 10}, busy, BLOCK).context_worker == "c0"


def test_kv_aware_picks_the_generation_worker_that_holds_the_prefix_unless_it_is_much_busier() -> None:
    workers = cluster(g0=load("g0", "generation", running=4), g1=load("g1", "generation", running=10, free=80))
    route = KVAwareRouter().route(512, {"g1": 24}, workers, BLOCK)
    assert route.generation_worker == "g1" and route.cached_tokens_on_generation == 384
    assert route.context_worker is not None  # 128 uncached tokens > 0
    swamped = cluster(g1=load("g1", "generation", running=60, free=10))
    assert KVAwareRouter().route(512, {"g1": 24}, swamped, BLOCK).generation_worker == "g0"


def test_kv_aware_generation_load_without_any_cache() -> None:
    workers = cluster(g0=load("g0", "generation", running=20, free=90), g1=load("g1", "generation", running=2, free=80))
    assert KVAwareRouter().route(200, {}, workers, BLOCK).generation_worker == "g1"
    # a worker the prompt does not fit in loses to one it does, whatever the other terms say
    cramped = cluster(g0=load("g0", "generation", free=5), g1=load("g1", "generation", free=13, running=30))
    assert KVAwareRouter().route(200, {}, cramped, BLOCK).generation_worker == "g1"


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "kv_aware"])
def test_a_short_uncached_part_is_prefilled_on_the_generation_worker(policy: str) -> None:
    router = make_router(policy, local_prefill_max_tokens=64)
    held = {"g0": 8, "g1": 8}  # 128 tokens of the prompt on both generation workers
    route = router.route(128 + 64, held, cluster(), BLOCK)
    assert route.context_worker is None and route.reason == "local_prefill"
    assert route.cached_tokens_on_generation == 128 and route.cached_tokens_on_context == 0
    above = make_router(policy, local_prefill_max_tokens=64).route(128 + 65, held, cluster(), BLOCK)
    assert above.context_worker is not None and above.reason == "disaggregated"
    assert make_router(policy, 64).route(30, {}, cluster(), BLOCK).context_worker is None  # short prompt


def test_a_fully_cached_prompt_never_goes_to_a_context_worker() -> None:
    route = KVAwareRouter(local_prefill_max_tokens=0).route(64, {"g0": 4}, cluster(), BLOCK)
    assert route == Route(None, "g0", 0, 64, "local_prefill")


def test_local_prefill_does_not_need_a_context_worker() -> None:
    no_context = [w for w in cluster() if w.role == "generation"]
    assert make_router("kv_aware", 64).route(10, {}, no_context, BLOCK).context_worker is None


def test_unhealthy_workers_are_never_chosen() -> None:
    workers = cluster(
        c0=load("c0", "context", healthy=False),
        g1=load("g1", "generation", healthy=False, free=100),
        g0=load("g0", "generation", free=1, running=60),
    )
    for policy in ("round_robin", "least_load", "kv_aware"):
        route = make_router(policy, 0).route(500, {"c0": 31, "g1": 31}, workers, BLOCK)
        assert (route.context_worker, route.generation_worker) == ("c1", "g0"), policy


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "kv_aware"])
def test_without_a_healthy_context_worker_the_generation_worker_prefills(policy: str) -> None:
    no_context = cluster(c0=load("c0", "context", healthy=False), c1=load("c1", "context", healthy=False))
    route = make_router(policy, 64).route(500, {}, no_context, BLOCK)
    assert route.context_worker is None and route.reason == "no_context_worker"


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "kv_aware"])
def test_no_healthy_generation_worker_is_a_routing_error(policy: str) -> None:
    with pytest.raises(RoutingError, match="no healthy generation or aggregated worker \\(0 known") as info:
        make_router(policy, 64).route(500, {}, [load("c0", "context")], BLOCK)
    assert info.value.role == "generation"


def test_aggregated_workers_serve_both_roles() -> None:
    workers = [load("a0", "aggregated", running=10), load("a1", "aggregated", running=1)]
    route = KVAwareRouter(local_prefill_max_tokens=0).route(1000, {"a0": 2}, workers, BLOCK)
    assert route == Route(None, "a1", 0, 0, "aggregated")
    route = LeastLoadRouter().route(1000, {}, workers, BLOCK)
    assert route.context_worker is None and route.generation_worker == "a1"
    router = RoundRobinRouter()
    assert [router.route(1000, {}, workers, BLOCK).generation_worker for _ in range(3)] == ["a0", "a1", "a0"]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown role 'decode'"):
        load("x", "decode")
    with pytest.raises(ValueError, match="prompt_len"):
        KVAwareRouter().route(0, {}, cluster(), BLOCK)
