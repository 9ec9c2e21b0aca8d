"""Hosts on one machine: network namespaces joined by a bridge, each with its own address, so that
Tandem's workers talk to each other (gRPC, and NIXL/UCX over TCP) as they would between nodes,
and faults can be put on one host's link (a rate limit, random loss, ``tc netem``, a partition).

    sudo python scripts/netns_cluster.py up context generation     # 10.77.0.2, 10.77.0.3
    sudo ip netns exec tandem-context tandem worker --role context --host 10.77.0.2 --port 50051
    sudo python scripts/netns_cluster.py throttle generation 32mbit  # tc tbf, both ways
    sudo python scripts/netns_cluster.py drop generation 0.01        # iptables: 1% of packets, both ways
    sudo python scripts/netns_cluster.py netem generation delay 50ms loss 1%   # where sch_netem exists
    sudo python scripts/netns_cluster.py clear generation            # all three off
    sudo python scripts/netns_cluster.py partition generation        # and `heal generation`
    sudo python scripts/netns_cluster.py down

The machine itself is the first host (10.77.0.1 on the bridge), so a test or router on it
reaches every namespace; traffic stays on the bridge and each namespace's loopback. Needs root
(CAP_NET_ADMIN) and iproute2; `drop` needs iptables (its statistic match). A kernel without
sch_netem (ours) has no added latency; `throttle` delays what exceeds the rate instead.
scripts/netns_sshd.py runs an sshd on each host, for `ray up`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass

NAMESPACE_PREFIX = "tandem-"


@dataclass(frozen=True, slots=True)
class Network:
    """A bridge and its /24: the machine is .1 on it, the hosts .2, .3, ... Two test modules that
    may run at once (other sessions share the machine) each take their own."""
    bridge: str = "tandem-br0"
    prefix: str = "10.77.0"


DEFAULT_NETWORK = Network()


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

    @property
    def inner_link(self) -> str:  # the end inside the namespace, which carries the host's address
        return f"tdi-{self.name[:10]}"

    def run(self, argv: list[str]) -> list[str]:
        """argv run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def up(names: list[str], network: Network = DEFAULT_NETWORK) -> list[Host]:
    """The bridge (.1: 10.77.0.1 by default) and one namespace per name (.2, .3, ...), loopback up."""
    down(names, network)
    _ip("link", "add", network.bridge, "type", "bridge")
    _ip("addr", "add", f"{network.prefix}.1/24", "dev", network.bridge)
    _ip("link", "set", network.bridge, "up")
    hosts = []
    for i, name in enumerate(names):
        host = Host(name, f"{network.prefix}.{i + 2}")
        inner = host.inner_link
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", host.namespace)
        _ip("link", "set", host.link, "master", network.bridge)
        _ip("link", "set", host.link, "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inner)
        _ip("-n", host.namespace, "link", "set", inner, "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        hosts.append(host)
    return hosts


def down(names: list[str] | None = None, network: Network = DEFAULT_NETWORK) -> None:
    """Remove the namespaces (their veth ends go with them) and the bridge; what is missing is skipped."""
    listed = _ip("netns", "list", check=False).stdout.split()
    namespaces = [n for n in listed if n.startswith(NAMESPACE_PREFIX)] if names is None else \
        [NAMESPACE_PREFIX + n for n in names]
    for namespace in namespaces:
        _ip("netns", "del", namespace, check=False)
    for name in names or [n.removeprefix(NAMESPACE_PREFIX) for n in namespaces]:
        _ip("link", "del", f"tdm-{name[:10]}", check=False)
    _ip("link", "del", network.bridge, check=False)


def netem(host: Host, *rules: str) -> None:
    """``tc netem`` on the host's link toward the bridge (its traffic to and from every other host)."""
    subprocess.run(["tc", "qdisc", "replace", "dev", host.link, "root", "netem", *rules],
                   check=True, capture_output=True, timeout=30)


def clear_netem(host: Host) -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", host.link, "root"], capture_output=True, timeout=30)


def throttle(host: Host, rate: str, burst: str = "64kb") -> None:
    """``tc tbf`` on both ends of the host's link: at most rate (e.g. "32mbit") each way, what
    exceeds it queued (up to 1 s) and so delayed, what overflows the queue dropped."""
    tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", "1s"]
    for argv in (["tc", "qdisc", "replace", "dev", host.link, *tbf],  # toward the host
                 host.run(["tc", "qdisc", "replace", "dev", host.inner_link, *tbf])):  # from it
        subprocess.run(argv, check=True, capture_output=True, timeout=30)


def drop(host: Host, probability: float) -> None:
    """iptables in the host's namespace drops each packet it receives or sends with this probability."""
    for chain in ("INPUT", "OUTPUT"):
        rule = ["-A", chain, "-m", "statistic", "--mode", "random", "--probability", str(probability), "-j", "DROP"]
        subprocess.run(host.run(["iptables", *rule]), check=True, capture_output=True, timeout=30)


def dropped(host: Host) -> int:
    """Packets drop()'s rules have dropped so far."""
    listed = subprocess.run(host.run(["iptables", "-L", "-v", "-n", "-x"]), check=True, capture_output=True, text=True,
                            timeout=30).stdout
    return sum(int(line.split()[0]) for line in listed.splitlines() if "statistic mode random" in line)


def clear(host: Host) -> None:
    """No rate limit, loss or netem on the host's link any more."""
    clear_netem(host)
    subprocess.run(host.run(["tc", "qdisc", "del", "dev", host.inner_link, "root"]), capture_output=True, timeout=30)
    for chain in ("INPUT", "OUTPUT"):
        subprocess.run(host.run(["iptables", "-F", chain]), capture_output=True, timeout=30)


def partition(host: Host) -> None:
    """Cut the host off: its link goes down, so packets to and from it are dropped, not refused."""
    _ip("link", "set", host.link, "down")


def heal(host: Host) -> None:
    _ip("link", "set", host.link, "up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "throttle", "drop", "netem", "clear", "partition", "heal"])
    parser.add_argument("names", nargs="*", help="host names (up); one host name, then a rate (throttle), "
                                                 "a probability (drop) or netem rules (netem)")
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
    {"throttle": lambda: throttle(host, *args.names[1:2]), "drop": lambda: drop(host, float(args.names[1])),
     "netem": lambda: netem(host, *args.names[1:]), "clear": lambda: clear(host),
     "partition": lambda: partition(host), "heal": lambda: heal(host)}[args.command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
