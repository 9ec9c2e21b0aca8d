"""Hosts on one machine: network namespaces joined by a bridge, each with its own address, so that
Tandem's workers talk to each other (gRPC, and NIXL/UCX over TCP) as they would between nodes,
and faults can be put on one host's link (``tc netem`` latency and loss, a partition).

    sudo python scripts/netns_cluster.py up context generation     # 10.77.0.2, 10.77.0.3
    sudo ip netns exec tandem-context tandem worker --role context --host 10.77.0.2 --port 50051
    sudo python scripts/netns_cluster.py netem generation delay 50ms loss 1%
    sudo python scripts/netns_cluster.py partition generation        # and `heal generation`
    sudo python scripts/netns_cluster.py down

The machine itself is the first host (10.77.0.1 on the bridge), so a test or router on it
reaches every namespace; traffic stays on the bridge and each namespace's loopback. Needs root
(CAP_NET_ADMIN) and iproute2. Not built yet: sshd in each namespace and ``ray up`` over it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass

BRIDGE = "tandem-br0"
PREFIX = "10.77.0"
NAMESPACE_PREFIX = "tandem-"


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    address: str

    @property
    def namespace(self) -> str:
        return NAMESPACE_PREFIX + self.name

    @property
    def link(self) -> str:  # the bridge end of its veth pair; faults go on it
        return f"tdm-{self.name[:10]}"

    def run(self, argv: list[str]) -> list[str]:
        """argv run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def up(names: list[str]) -> list[Host]:
    """The bridge (10.77.0.1) and one namespace per name (10.77.0.2, .3, ...), loopback up."""
    down(names)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{PREFIX}.1/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    hosts = []
    for i, name in enumerate(names):
        host = Host(name, f"{PREFIX}.{i + 2}")
        inner = f"tdi-{name[:10]}"
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", host.namespace)
        _ip("link", "set", host.link, "master", BRIDGE)
        _ip("link", "set", host.link, "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inner)
        _ip("-n", host.namespace, "link", "set", inner, "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        hosts.append(host)
    return hosts


def down(names: list[str] | None = None) -> None:
    """Remove the namespaces (their veth ends go with them) and the bridge; what is missing is skipped."""
    listed = _ip("netns", "list", check=False).stdout.split()
    namespaces = [n for n in listed if n.startswith(NAMESPACE_PREFIX)] if names is None else \
        [NAMESPACE_PREFIX + n for n in names]
    for namespace in namespaces:
        _ip("netns", "del", namespace, check=False)
    for name in names or [n.removeprefix(NAMESPACE_PREFIX) for n in namespaces]:
        _ip("link", "del", f"tdm-{name[:10]}", check=False)
    _ip("link", "del", BRIDGE, check=False)


def netem(host: Host, *rules: str) -> None:
    """``tc netem`` on the host's link toward the bridge (its traffic to and from every other host)."""
    subprocess.run(["tc", "qdisc", "replace", "dev", host.link, "root", "netem", *rules],
                   check=True, capture_output=True, timeout=30)


def clear_netem(host: Host) -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", host.link, "root"], capture_output=True, timeout=30)


def partition(host: Host) -> None:
    """Cut the host off: its link goes down, so packets to and from it are dropped, not refused."""
    _ip("link", "set", host.link, "down")


def heal(host: Host) -> None:
    _ip("link", "set", host.link, "up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "netem", "clear", "partition", "heal"])
    parser.add_argument("names", nargs="*", help="host names (up); one host name then netem rules (netem)")
    args = parser.parse_args()
    if args.command == "up":
        for host in up(args.names):
            print(f"{host.name}: {host.address} (ip netns exec {host.namespace} ...)")
        return 0
    if args.command == "down":
        down(args.names or None)
        return 0
    listed = _ip("netns", "list", check=False).stdout.split()
    hosts = {n.removeprefix(NAMESPACE_PREFIX): n for n in listed if n.startswith(NAMESPACE_PREFIX)}
    if not args.names or args.names[0] not in hosts:
        parser.error(f"name a host that is up: {sorted(hosts)}")
    host = Host(args.names[0], "")
    {"netem": lambda: netem(host, *args.names[1:]), "clear": lambda: clear_netem(host),
     "partition": lambda: partition(host), "heal": lambda: heal(host)}[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
