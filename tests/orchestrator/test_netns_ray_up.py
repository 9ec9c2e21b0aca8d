"""`ray up` the way users bring a cluster up, on hosts made of network namespaces: Ray's local
(on-premise) provider reaches a head host, a context host and a generation host over SSH, each
host running its own sshd (scripts/netns_sshd.py) on its own address (scripts/netns_cluster.py).
The cluster file is scripts/cluster/netns_local.yaml, filled in: the head starts Ray's head and
`tandem serve`; the autoscaler on the head starts Ray on the two other hosts with `ray start
--address`, each offering its host's role resource, so each pool's worker lands on its own host.
One request through the REST endpoint moves its prompt's KV across hosts. Then `ray down`: Ray is
gone from the head at once, the worker hosts' raylets and Tandem workers exit once the head's GCS
is gone, what Ray leaves there besides goes at `ray stop` over SSH on each worker host (the local
provider's `ray down` does not reach them), and after sshd nothing of the cluster is left.

Needs root (CAP_NET_ADMIN), iproute2, openssh-server, the ssh client and rsync; skipped, saying
which is missing, where they are not there. Everything runs in the test's own namespaces, on
their own bridge and subnet, and is kept under one temp dir (Ray's included, never /tmp/ray) but
Ray's SSH control sockets (/tmp/ray_ssh_*) and each host's /etc/netns/NAMESPACE, both removed."""
from __future__ import annotations

import contextlib
import hashlib
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
from types import ModuleType

import grpc
import httpx
import pytest
import yaml

from netns_hosts import kill_namespace, load_script, namespace_pids, netns_cluster, skip_without_namespaces

from tandem.models.gguf_metadata_cache import cache_root
from tandem.proto import tandem_pb2 as pb
from tandem.proto import tandem_pb2_grpc

pytestmark = pytest.mark.slow

HOSTS = ["rup-head", "rup-ctx", "rup-gen"]  # their own names, bridge and subnet: the other netns tests may run beside
BRIDGE, SUBNET = "tandem-rup0", "10.77.1"
HTTP_PORT = 8000
READY_S = 300
BLOCK_BYTES = 737_280  # one block of 16 tokens of SmolLM2 in float32
RAY_GCS_RECONNECT_S = 5  # a worker host's raylet exits this long after the head's GCS is gone (Ray's default: 60)


class RayUpCluster:
    """The hosts with their sshd, the rendered cluster file, and `ray up` / `ray down` run on it."""

    def __init__(self, netns: ModuleType, sshd: ModuleType, folder: Path) -> None:
        self.netns, self.sshd, self.folder = netns, sshd, folder
        self.network = netns.Network(BRIDGE, SUBNET)
        self.hosts = netns.up(HOSTS, self.network)
        self.head, self.ctx, self.gen = self.hosts
        self.ssh_hosts: list = []
        self.key: Path | None = None  # root's key to every host
        self.cluster_name = folder.name  # unique: names Ray's state file and SSH control sockets
        self.cluster_yaml = folder / "cluster.yaml"
        self.url = f"http://{self.head.address}:{HTTP_PORT}"
        # `ray up` and `ray down` run on this machine, the bridge's first address, as on a laptop;
        # their state and config cache (written even with --no-config-cache) go to the folder.
        # Autoscaler v1: v2 (ray up's default since Ray 2.50) counts the local provider's head
        # toward min_workers, its node type being the workers' too, and starts one worker of two.
        self.env = {**os.environ, "RAY_TMPDIR": str(folder), "TMPDIR": str(folder), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_UP_enable_autoscaler_v2": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def start_hosts(self) -> None:
        self.key = key = self.sshd.make_key(self.folder)
        common = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                  "UCX_TLS": "tcp", "TANDEM_CACHE_DIR": str(cache_root()),
                  "RAY_gcs_rpc_server_reconnect_timeout_s": str(RAY_GCS_RECONNECT_S)}
        roles = {self.head.name: {"AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                 self.ctx.name: {"TANDEM_NODE_RESOURCES": json.dumps({"tandem_context": 1})},
                 self.gen.name: {"TANDEM_NODE_RESOURCES": json.dumps({"tandem_generation": 1})}}
        for host in self.hosts:  # each host's own RAY_TMPDIR, as each machine has its own /tmp
            env = {**common, **roles[host.name], "RAY_TMPDIR": str(self.folder / host.name)}
            self.ssh_hosts.append(self.sshd.start(host, self.folder, key.with_suffix(".pub"), env))
        serve_dir = self.folder / "serve"
        serve_dir.mkdir()
        pool = {"count": 1, "device": "cpu", "dtype": "float32", "kv_cache_bytes": 128 * BLOCK_BYTES, "num_cpus": 1}
        (serve_dir / "serve.yaml").write_text(yaml.safe_dump({
            "served_model_name": "smollm2",
            "pools": {"context": {**pool, "resources": {"tandem_context": 1}},
                      "generation": {**pool, "resources": {"tandem_generation": 1}}},
            "router": {"local_prefill_max_tokens": 0, "max_retries": 1},  # every request disaggregated
            "limits": {"request_timeout_s": 120},
            "server": {"host": "0.0.0.0", "port": HTTP_PORT},
        }))
        self.cluster_yaml.write_text(self.sshd.render_cluster_yaml({
            "cluster_name": self.cluster_name, "head_ip": self.head.address,
            "worker_ips": f"{self.ctx.address}, {self.gen.address}", "ssh_private_key": str(key),
            "serve_dir": str(serve_dir), "venv_bin": str(Path(sys.executable).parent)}))

    def ray(self, *argv: str, log: str) -> subprocess.CompletedProcess:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        with open(self.folder / log, "ab") as out:
            return subprocess.run([ray_cli, *argv, str(self.cluster_yaml)], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=self.env, timeout=300)

    def serve_log(self) -> str:
        path = self.ssh_hosts[0].home / "tandem-serve.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def log(self, name: str) -> str:
        path = self.folder / name
        return path.read_text(errors="replace")[-4000:] if path.is_file() else f"({name}: none)"

    def serving(self) -> bool:
        """Whether `tandem serve` on the head is serving; fails at once if the autoscaler could not
        start Ray on a worker host (it does not try again)."""
        failed = [path for path in self.monitor_logs() if "update-failed" in path.read_text(errors="replace")]
        assert not failed, "".join(path.read_text(errors="replace")[-6000:] for path in failed)
        return "Tandem is serving" in self.serve_log()

    def monitor_logs(self) -> list[Path]:
        """The autoscaler's logs, on the head (its updaters' SSH sessions go to monitor.out)."""
        return sorted((self.ssh_hosts[0].folder / "ray").glob("session_*/logs/monitor.*"))

    def monitor_out(self) -> str:
        outs = [path for path in self.monitor_logs() if path.suffix == ".out"]
        return "".join(path.read_text(errors="replace")[-3000:] for path in outs)

    def pids(self, host) -> list[int]:
        return namespace_pids(host.namespace)

    def raylets_and_workers(self) -> list[str]:
        """Raylets and Tandem workers (Ray actors) in any host's namespace."""
        comms = [_comm(pid) for host in self.hosts for pid in self.pids(host)]
        return [comm for comm in comms if comm in ("raylet", "ray::WorkerActor"[:15])]  # comm: 15 bytes

    def left(self) -> dict[str, list[str]]:
        """What still runs in each host's namespace but its sshd: {host: [comm (pid)]}."""
        sshd_pids = {ssh_host.pid() for ssh_host in self.ssh_hosts}
        found = {host.name: [f"{_comm(pid)} ({pid})" for pid in self.pids(host) if pid not in sshd_pids]
                 for host in self.hosts}
        return {name: comms for name, comms in found.items() if comms}

    def teardown(self) -> None:
        """Whatever is left, killed: our namespaces' processes, sshd, SSH control masters."""
        for ssh_host in self.ssh_hosts:
            self.sshd.stop(ssh_host)
        for host in self.hosts:
            kill_namespace(host.namespace)
        for pid in _pids_naming(self.control_dir()):  # `ray up`'s ssh masters linger 10 s (ControlPersist)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.control_dir(), ignore_errors=True)
        with contextlib.suppress(OSError):
            self.control_dir().parent.rmdir()  # when no other cluster's sockets are there
        self.netns.down(HOSTS, self.network)

    def close_ssh_masters(self) -> None:
        """`ssh -O exit` to each host's control master, which `ray up` and `ray down` leave behind
        for 10 s (ControlPersist) on this machine."""
        for host in self.hosts:
            subprocess.run(["ssh", "-o", f"ControlPath={self.control_dir()}/%C", "-O", "exit", f"root@{host.address}"],
                           capture_output=True, timeout=30)

    def control_dir(self) -> Path:
        """Where Ray's SSH command runner keeps this cluster's control sockets (command_runner.py)."""
        user, cluster = (hashlib.sha256(text.encode()).hexdigest()[:10] for text in ("root", self.cluster_name))
        return Path(f"/tmp/ray_ssh_{user}/{cluster}")


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return "?"


def _pids_naming(text: Path) -> list[int]:
    """Every process on the machine whose command line names text."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(text).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _wait(predicate, timeout: float, explain) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, explain()
        time.sleep(0.5)
    return time.monotonic() - started


@pytest.fixture
def cluster():
    skip_without_namespaces()
    sshd = load_script("netns_sshd")
    if (reason := sshd.missing()) is not None:
        pytest.skip(f"cannot run sshd on namespaced hosts here: {reason}")
    # Short: Ray's socket paths under its temp dir must fit in 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="tdm-rup-", dir="/tmp"))
    cluster = RayUpCluster(netns_cluster(), sshd, folder)
    try:
        cluster.start_hosts()
        yield cluster
    finally:
        cluster.teardown()
        shutil.rmtree(folder, ignore_errors=True)
        address_file = Path("/tmp/ray/ray_current_cluster")
        assert not (address_file.is_file() and address_file.read_text().startswith(cluster.head.address)), \
            "the test's Ray address leaked into /tmp/ray"


def test_ray_up_over_ssh_serves_across_hosts_and_ray_down_leaves_nothing(cluster: RayUpCluster) -> None:
    started = time.monotonic()
    up = cluster.ray("up", "-y", "--no-config-cache", "--disable-usage-stats", "--log-color", "false", log="ray-up.log")
    assert up.returncode == 0, cluster.log("ray-up.log")
    up_s = time.monotonic() - started
    ready_s = _wait(cluster.serving, READY_S, lambda: cluster.serve_log()[-4000:] + cluster.monitor_out())
    print(f"\nray up {up_s:.1f} s (the head, over SSH); tandem serve ready {ready_s:.1f} s later (the "
          "autoscaler on the head started Ray on both worker hosts over SSH)")
    _serve_one_request_across_hosts(cluster)
    served = time.monotonic()
    _ray_down_leaves_nothing(cluster)
    print(f"request and checks {served - started - up_s - ready_s:.1f} s; everything gone "
          f"{time.monotonic() - served:.1f} s after ray down began; "
          f"whole test {time.monotonic() - started:.1f} s from ray up")


def _serve_one_request_across_hosts(cluster: RayUpCluster) -> None:
    joined = dict(re.findall(r"worker (\S+) \(\w+, epoch \d+\) at (\S+) joined", cluster.serve_log()))
    assert joined["context-0"].startswith(cluster.ctx.address + ":"), joined
    assert joined["generation-0"].startswith(cluster.gen.address + ":"), joined
    reply = httpx.post(f"{cluster.url}/v1/completions", timeout=180, json={
        "model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8, reply.text
    with grpc.insecure_channel(joined["generation-0"]) as channel:
        stats = tandem_pb2_grpc.WorkerStub(channel).Stats(pb.StatsRequest(), timeout=10)
    # The prompt's one block, READ by the generation host from the context host.
    assert (stats.num_transferred_blocks, stats.num_transferred_bytes) == (1, BLOCK_BYTES), stats
    path = httpx.get(f"{cluster.url}/health", timeout=10).json()["kv_transfer"]["paths"]["context-0->generation-0"]
    assert path["ok"], path


def _ray_down_leaves_nothing(cluster: RayUpCluster) -> None:
    downed = time.monotonic()
    down = cluster.ray("down", "-y", log="ray-down.log")
    down_s = time.monotonic() - downed
    assert down.returncode == 0, cluster.log("ray-down.log")
    cluster.close_ssh_masters()  # their sessions would count as left on the hosts
    _wait(lambda: cluster.head.name not in cluster.left(), 10,
          lambda: f"left on the head after ray down: {cluster.left()}")
    # The local provider's `ray down` runs `ray stop` on the head only (its terminate_node marks a
    # worker host free, nothing more): a worker host's raylet, and the Tandem worker with it, exit
    # once the head's GCS has been gone for RAY_GCS_RECONNECT_S ...
    gone_s = _wait(lambda: not cluster.raylets_and_workers(), RAY_GCS_RECONNECT_S + 30,
                   lambda: f"left after ray down: {cluster.raylets_and_workers()}")
    print(f"ray down {down_s:.1f} s, nothing left on the head; no raylet or Tandem worker on the worker hosts "
          f"{gone_s:.1f} s later")
    # ... while its log monitor, dashboard and runtime-env agents stay (the agents a minute, the
    # log monitor for good) until `ray stop` on the host, as an operator runs it.
    for host in (cluster.ctx, cluster.gen):
        stopped = subprocess.run(cluster.sshd.ssh(cluster.key, host, "ray stop"), capture_output=True, text=True,
                                 timeout=60)
        assert stopped.returncode == 0, stopped.stderr
    assert not cluster.left(), cluster.left()
    for ssh_host in cluster.ssh_hosts:
        cluster.sshd.stop(ssh_host)
    assert not any(cluster.pids(host) for host in cluster.hosts), {h.name: cluster.pids(h) for h in cluster.hosts}
    assert not _pids_naming(cluster.folder), [_comm(pid) for pid in _pids_naming(cluster.folder)]  # no sshd, no Ray
