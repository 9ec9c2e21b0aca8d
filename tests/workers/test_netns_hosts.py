"""A context worker and a generation worker on two hosts made of network namespaces
(scripts/netns_cluster.py), each bound to its own address, with UCX held to TCP: the KV moves
between them as it would between nodes. Then the context host is cut off mid-request: the READ's
deadline fires, the request fails cleanly and retriably, and once the host is back and its lease
has run out, every block is free on both sides and the pair serves again. The same when the
generation host is cut off in the middle of its READ (slowed so that there is a middle). Last, the context
host's link is slowed and made lossy (tc tbf and iptables' random drop: this kernel has no
sch_netem): the READ takes longer, at least its bytes over the rate, and the request finishes.

Needs root (CAP_NET_ADMIN) and iproute2, the last test iptables; skipped, saying so, where
namespaces cannot be made or iptables is missing."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import grpc
import pytest
from netns_hosts import netns_cluster, skip_without_namespaces
from worker_rpc import generate, greedy, pool_full, prefill, run_disaggregated, tokens_of, wait_for

from tandem.proto import tandem_pb2 as pb

HOSTS = ["hx-ctx", "hx-gen"]  # short, no real cluster's; own bridge and subnet: other netns tests may run beside
BRIDGE, SUBNET = "tandem-hx0", "10.77.2"
KV_CACHE_BYTES = 64 * 737_280  # 64 blocks of 16 tokens of SmolLM2 in float32
# A lease outlasts the slowest READ (the transfer timeout) with 1.5 s to spare for the Generate call
# to reach the generation worker; the fault tests wait for it to run out.
TRANSFER_TIMEOUT_S, LEASE_S = 3.0, 4.5
PROMPT = list(range(1000, 1040))  # three blocks
RATE, RATE_BYTES_PER_S, BURST_BYTES, LOSS = "32mbit", 4_000_000, 65_536, 0.05


@pytest.fixture(scope="module")
def hosts(start_worker):
    skip_without_namespaces()
    netns = netns_cluster()
    network = netns.Network(BRIDGE, SUBNET)
    context_host, generation_host = netns.up(HOSTS, network)
    try:
        common = ("--kv-cache-bytes", str(KV_CACHE_BYTES), "--transfer-timeout", str(TRANSFER_TIMEOUT_S),
                  "--lease-seconds", str(LEASE_S))
        env = {"UCX_TLS": "tcp"}  # not shared memory or cma, which two processes on one machine could use
        context, generation = start_worker.all(
            start_worker.launch("context", "--host", context_host.address, *common, env=env,
                                wrap=["ip", "netns", "exec", context_host.namespace]),
            start_worker.launch("generation", "--host", generation_host.address, *common, env=env,
                                wrap=["ip", "netns", "exec", generation_host.namespace]),
        )
        yield netns, (context_host, generation_host), (context, generation)
    finally:
        netns.down(HOSTS, network)


def test_workers_listen_on_their_own_hosts_and_kv_moves_between_them(hosts) -> None:
    _, (context_host, generation_host), pair = hosts
    assert pair[0].address.startswith(context_host.address + ":")
    assert pair[1].address.startswith(generation_host.address + ":")
    tokens, reply, chunks = run_disaggregated(pair, "netns-1", PROMPT)
    assert chunks[0].transfer.num_blocks == 3 and chunks[0].transfer.num_bytes == 3 * 737_280
    # The reference: the generation worker alone, without a handle.
    assert tokens == tokens_of(generate(pair[1], "netns-reference", PROMPT))


def test_a_partitioned_context_host_fails_the_read_cleanly_and_frees_everything(hosts) -> None:
    netns, (context_host, _), (context, generation) = hosts
    run_disaggregated((context, generation), "netns-2-pairing", list(range(1500, 1540)))  # the peers know each other
    prompt = list(range(2000, 2040))
    reply = prefill(context, "netns-2", prompt)
    netns.partition(context_host)
    started = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as failed:
            generate(generation, "netns-2", prompt, reply)
        elapsed = time.monotonic() - started
    finally:
        netns.heal(context_host)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert "READ of 3 blocks" in failed.value.details() and "timed out" in failed.value.details()
    assert TRANSFER_TIMEOUT_S - 0.5 < elapsed < TRANSFER_TIMEOUT_S + 5, f"the READ's deadline did not bound it: {elapsed:.1f} s"
    wait_for(lambda: pool_full(generation), 15, "the generation worker's reserved blocks to come back")
    wait_for(lambda: context.stats().num_leases == 0 and pool_full(context), LEASE_S + 15,
             "the context worker's lease to run out and its blocks to come back")
    tokens, _, chunks = run_disaggregated((context, generation), "netns-3", list(range(3000, 3040)))
    assert len(tokens) > 1 and chunks[0].transfer.num_blocks == 3  # the pair serves again


def test_a_slow_lossy_context_link_slows_the_read_and_the_request_still_finishes(hosts) -> None:
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed: no random loss on a link without sch_netem")
    netns, (context_host, _), pair = hosts
    _, _, plain = run_disaggregated(pair, "netns-4", list(range(4000, 4040)))  # the same size, no fault
    prompt = list(range(5000, 5040))
    try:
        netns.throttle(context_host, RATE, burst=f"{BURST_BYTES // 1024}kb")
        netns.drop(context_host, LOSS)
    except subprocess.CalledProcessError as error:
        netns.clear(context_host)
        pytest.skip(f"this kernel cannot slow or drop on a link: {error.stderr.decode().strip()}")
    try:
        tokens, _, chunks = run_disaggregated(pair, "netns-5", prompt)
        dropped = netns.dropped(context_host)
    finally:
        netns.clear(context_host)
    slow, fast = chunks[0].transfer, plain[0].transfer
    assert slow.num_blocks == 3 and slow.num_bytes == 3 * 737_280 and dropped > 0
    floor_s = (slow.num_bytes - BURST_BYTES) / RATE_BYTES_PER_S  # a burst at once, then the rate
    assert floor_s < slow.seconds < TRANSFER_TIMEOUT_S and slow.seconds > fast.seconds, (slow.seconds, fast.seconds)
    print(f"\nREAD of 3 blocks: {fast.seconds:.3f} s on a plain link, {slow.seconds:.3f} s at {RATE} with "
          f"{LOSS:.0%} loss ({dropped} packets dropped; floor {floor_s:.3f} s)")
    assert tokens == tokens_of(generate(pair[1], "netns-5-reference", prompt))


def test_a_generation_host_cut_off_mid_read_fails_cleanly_and_frees_everything(hosts) -> None:
    netns, (context_host, generation_host), (context, generation) = hosts
    prompt = list(range(6000, 6040))
    reply = prefill(context, "netns-6", prompt)
    read_before = generation.stats().num_transferred_blocks
    netns.throttle(context_host, RATE, burst=f"{BURST_BYTES // 1024}kb")  # the READ takes ~0.55 s: time to cut it
    request = pb.GenerateRequest(request_id="netns-6", prompt_token_ids=prompt, params=greedy(),
                                 kv_handle=reply.kv_handle, first_token_id=reply.first_token_id)
    outcome: list[BaseException | list] = []

    def call() -> None:
        try:
            outcome.append(list(generation.stub.Generate(request, timeout=TRANSFER_TIMEOUT_S + 1.5)))
        except grpc.RpcError as error:
            outcome.append(error)

    caller = threading.Thread(target=call)
    try:
        caller.start()
        time.sleep(0.25)
        netns.partition(generation_host)
        caller.join(TRANSFER_TIMEOUT_S + 10)
    finally:
        netns.heal(generation_host)
        netns.clear(context_host)
    assert not caller.is_alive() and len(outcome) == 1
    # The client (on the other side of the cut) hears the worker's UNAVAILABLE or its own deadline.
    assert isinstance(outcome[0], grpc.RpcError), outcome[0]
    assert outcome[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), outcome[0]
    wait_for(lambda: pool_full(generation), 15, "the generation worker's reserved blocks to come back")
    assert generation.stats().num_transferred_blocks == read_before, "the READ finished before the cut"
    wait_for(lambda: context.stats().num_leases == 0 and pool_full(context), LEASE_S + 15,
             "the context worker's lease to run out and its blocks to come back")
    tokens, _, chunks = run_disaggregated((context, generation), "netns-7", list(range(7000, 7040)))
    assert len(tokens) > 1 and chunks[0].transfer.num_blocks == 3  # the pair serves again
