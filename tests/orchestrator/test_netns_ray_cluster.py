"""A three-host Ray cluster made of network namespaces (scripts/netns_cluster.py): a head host
running Ray's head and `tandem serve`, a context host and a generation host whose Ray nodes join
it with `ray start --address` and offer a `context` or `generation` resource, so that each pool's
worker lands on its own host and the KV crosses hosts over UCX TCP. Then the generation host's
raylet is killed with SIGKILL under load: every request completes or fails cleanly, and once the
host's Ray node is back the pool is at full strength again, on a new epoch, with every block free.

Needs root (CAP_NET_ADMIN) and iproute2; skipped, saying so, where namespaces cannot be made.
Everything the test starts runs inside its namespaces and is killed by namespace at the end."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from netns_hosts import kill_namespace, namespace_pids, netns_cluster, skip_without_namespaces

from tandem.models.gguf_metadata_cache import cache_root
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc

pytestmark = pytest.mark.slow

HOSTS = ["head", "ctx", "gen"]
RAY_PORT, HTTP_PORT = 6390, 8090
READY_S = 240
KV_CACHE_BYTES = 128 * 737_280  # 128 blocks of 16 tokens of SmolLM2 in float32


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


class Cluster:
    def __init__(self, netns, hosts, folder: Path) -> None:
        self.netns, self.folder = netns, folder
        self.head, self.ctx, self.gen = hosts
        self.url = f"http://{self.head.address}:{HTTP_PORT}"
        # The GCS checks each raylet every second instead of every 3 s: a killed raylet's node is
        # found dead after 5 failed checks, ~5 s instead of ~15 s (the test waits for that).
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TANDEM_CACHE_DIR": str(cache_root()),
                    "UCX_TLS": "tcp", "OMP_NUM_THREADS": "1", "RAY_health_check_period_ms": "1000"}
        self.serve: subprocess.Popen | None = None
        # Ray's own temp dir, not /tmp/ray: `ray start --head` writes its address there, and every
        # later ray.init() on this machine would join this cluster instead of starting its own.
        # Short: Ray's socket paths must fit in 107 bytes.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="tdm-ray-", dir="/tmp"))

    def run(self, host, argv: list[str], log: str) -> subprocess.Popen:
        with open(self.folder / log, "ab") as out:
            return subprocess.Popen(host.run(argv), stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def start_node(self, host, resource: str) -> None:
        argv = [_ray_bin(), "start", "--address", f"{self.head.address}:{RAY_PORT}", "--node-ip-address",
                host.address, "--num-cpus", "2", "--resources", json.dumps({resource: 1}), "--disable-usage-stats",
                "--temp-dir", str(self.ray_temp)]
        assert self.run(host, argv, f"ray-{host.name}.log").wait(120) == 0, self.log(f"ray-{host.name}.log")

    def kill_raylet(self, host) -> int:
        for pid in self.pids(host):
            if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                os.kill(pid, signal.SIGKILL)
                return pid
        raise AssertionError(f"no raylet in {host.namespace}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def joined(self) -> list[tuple[str, int, str]]:
        """(worker id, epoch, address) of every worker the orchestrator saw join, in order (its log)."""
        found = re.findall(r"worker (\S+) \(\w+, epoch (\d+)\) at (\S+) joined", self.log("serve.log", whole=True))
        return [(worker, int(epoch), address) for worker, epoch, address in found]

    def log(self, name: str, whole: bool = False) -> str:
        text = (self.folder / name).read_text(errors="replace")
        return text if whole else text[-4000:]

    def stop(self) -> None:
        for host in (self.head, self.ctx, self.gen):  # everything that runs in our namespaces
            if self.serve is not None and host is self.head and self.serve.poll() is None:
                self.serve.send_signal(signal.SIGINT)
                try:
                    self.serve.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            kill_namespace(host.namespace)

    def pids(self, host) -> list[int]:
        return namespace_pids(host.namespace)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    skip_without_namespaces()
    netns = netns_cluster()
    folder = tmp_path_factory.mktemp("netns-ray")
    cluster = Cluster(netns, netns.up(HOSTS), folder)
    try:
        head = [_ray_bin(), "start", "--head", "--node-ip-address", cluster.head.address, "--port", str(RAY_PORT),
                "--num-cpus", "0", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(cluster.ray_temp)]
        assert cluster.run(cluster.head, head, "ray-head.log").wait(120) == 0, cluster.log("ray-head.log")
        cluster.start_node(cluster.ctx, "context")
        cluster.start_node(cluster.gen, "generation")
        pool = {"count": 1, "device": "cpu", "dtype": "float32", "kv_cache_bytes": KV_CACHE_BYTES, "num_cpus": 1}
        config = {
            "served_model_name": "smollm2",
            "pools": {"context": {**pool, "resources": {"context": 1}},
                      "generation": {**pool, "resources": {"generation": 1}}},
            "router": {"local_prefill_max_tokens": 0, "max_retries": 1},
            "limits": {"request_timeout_s": 120},
        }
        (folder / "serve.yaml").write_text(yaml.safe_dump(config))
        tandem = str(Path(sys.executable).with_name("tandem"))
        cluster.serve = cluster.run(cluster.head, [tandem, "serve", "--address", f"{cluster.head.address}:{RAY_PORT}",
                                                   "--config", str(folder / "serve.yaml"), "--host", cluster.head.address,
                                                   "--port", str(HTTP_PORT)], "serve.log")
        _wait(lambda: "Tandem is serving" in cluster.log("serve.log"), READY_S, lambda: cluster.log("serve.log"))
        yield cluster
    finally:
        cluster.stop()
        netns.down(HOSTS)
        shutil.rmtree(cluster.ray_temp, ignore_errors=True)
        assert not _joins_our_cluster(cluster.head.address), "the test's Ray address leaked into /tmp/ray"


def _joins_our_cluster(head_address: str) -> bool:
    """Whether a plain ray.init() on this machine would now try to join the test's cluster."""
    address_file = Path("/tmp/ray/ray_current_cluster")
    return address_file.is_file() and address_file.read_text().startswith(head_address)


def _wait(predicate, timeout: float, explain) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, explain()
        time.sleep(0.5)


def _complete(url: str, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=180, json={
        "model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def test_each_pool_runs_on_its_own_host_and_kv_crosses_hosts(cluster: Cluster) -> None:
    addresses = {worker: address for worker, _, address in cluster.joined()}
    assert addresses["context-0"].startswith(cluster.ctx.address + ":"), addresses
    assert addresses["generation-0"].startswith(cluster.gen.address + ":"), addresses
    reply = _complete(cluster.url, "The capital of France is", 8)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8, reply.text
    path = cluster.health()["kv_transfer"]["paths"]["context-0->generation-0"]
    assert path["ok"] and path["detail"].startswith("737280 B"), path  # the prompt's block, read across hosts


def test_a_killed_raylet_fails_requests_cleanly_and_its_host_comes_back(cluster: Cluster) -> None:
    first_epoch = {worker: epoch for worker, epoch, _ in cluster.joined()}["generation-0"]

    async def load() -> list[int | str]:
        async with httpx.AsyncClient(timeout=180) as client:
            async def one(i: int) -> int | str:
                body = {"model": "smollm2", "prompt": f"Story {i}: once upon a time", "max_tokens": 200, "ignore_eos": True,
                        "temperature": 0, "stream": True}
                async with client.stream("POST", f"{cluster.url}/v1/completions", json=body) as response:
                    text = "".join([line async for line in response.aiter_lines()])
                    if response.status_code != 200:
                        return response.status_code
                    return "error-event" if '"error"' in text else ("done" if "[DONE]" in text else "cut")
            requests = [asyncio.create_task(one(i)) for i in range(6)]
            await asyncio.sleep(1.5)  # the streams are under way
            cluster.kill_raylet(cluster.gen)
            return await asyncio.gather(*requests)

    started = time.monotonic()
    outcomes = asyncio.run(load())
    print(f"\nraylet killed under load: outcomes {outcomes} in {time.monotonic() - started:.1f} s")
    assert all(o in ("done", "error-event", 503) for o in outcomes), outcomes  # nothing lost, nothing cut short

    cluster.start_node(cluster.gen, "generation")  # the host's Ray node comes back

    def recovered() -> bool:
        epochs = [epoch for worker, epoch, _ in cluster.joined() if worker == "generation-0"]
        return epochs[-1] != first_epoch and cluster.health() == {**cluster.health(), "status": "ok"} and \
            all(cluster.health()["workers"].values())
    restarted = time.monotonic()
    _wait(recovered, READY_S, lambda: json.dumps(cluster.health()) + cluster.log("serve.log"))
    print(f"generation host back and its worker serving on a new epoch {time.monotonic() - restarted:.1f} s after ray start")
    reply = _complete(cluster.url, "The capital of Italy is", 8)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8, reply.text
    for worker, address in {worker: address for worker, _, address in cluster.joined()}.items():
        with grpc.insecure_channel(address) as channel:
            stub = tandem_pb2_grpc.WorkerStub(channel)

            def settled() -> bool:
                stats = stub.Stats(pb.StatsRequest(), timeout=10)
                return stats.num_leases == 0 and stats.num_free_blocks == stats.num_total_blocks
            _wait(settled, 60, lambda: f"{worker} kept blocks or leases")
