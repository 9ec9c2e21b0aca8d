"""sshd on hosts made of network namespaces (scripts/netns_cluster.py), so that Ray's cluster
launcher (`ray up`, then the autoscaler on the head) reaches them over SSH as it reaches machines.

Each host runs its own sshd (Debian's openssh-server) on its own address, with its own config,
host key, pid file, log and home directory under one folder; root logs in there by a key made
here, never by a password. The hosts share this machine's filesystem and process table, so what
would differ between machines is made per host: root's home, through an /etc/passwd of the host's
own (iproute2 bind-mounts /etc/netns/<namespace>/passwd over /etc/passwd for whatever `ip netns
exec` starts, sshd and so every session, so that `~` means the host's home to the shell, rsync
and ssh alike; /etc/shadow likewise, root's account unlocked); a .bashrc there exporting the host's environment (what a machine's
/etc/environment would hold); and a `ray` first on its PATH whose `ray stop` stops only the
processes in the host's namespace, where the real one would stop every Ray on the machine
(`ray down` runs `ray stop` on the head).

Life cycle: ``make_key`` once, ``start`` per host, ``render_cluster_yaml`` for
scripts/cluster/netns_local.yaml, ``ray up`` ... ``ray down``, ``stop`` per host.

    ip netns exec tandem-head python scripts/netns_sshd.py stop-here   # that `ray stop`

Needs root, iproute2, openssh-server (/usr/sbin/sshd), the ssh client and rsync (`ray up` copies
files with it, to and from every host).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
TEMPLATE = Path(__file__).resolve().parent / "cluster" / "netns_local.yaml"
_CONFIG = """\
ListenAddress {address}
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
# No PAM: a container's PAM session modules (loginuid) fail; the key is the only way in.
UsePAM no
# The key and this config live under /tmp (mode 1777), which StrictModes refuses.
StrictModes no
"""


def missing() -> str | None:
    """Why SSH hosts cannot be made here, or None."""
    if not Path(SSHD).is_file():
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@dataclass(frozen=True, slots=True)
class SshHost:
    host: object  # netns_cluster.Host
    folder: Path  # its config, host key, pid file, log and home

    @property
    def home(self) -> Path:
        return self.folder / "home"

    def pid(self) -> int | None:
        pid_file = self.folder / "sshd.pid"
        return int(pid_file.read_text()) if pid_file.is_file() else None


def make_key(folder: Path) -> Path:
    """An ed25519 key pair without a passphrase: folder/id_ed25519 and its .pub."""
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tandem-netns", "-f", str(key)],
                   check=True, capture_output=True, timeout=30)
    return key


def _write_ray_shim(bin_dir: Path) -> None:
    """bin_dir/ray: `ray stop` runs stop-here, anything else this Python's own `ray`."""
    shim = bin_dir / "ray"
    bin_dir.mkdir(exist_ok=True)
    stop = shlex.join([sys.executable, str(Path(__file__).resolve()), "stop-here"])
    real = shlex.quote(str(Path(sys.executable).with_name("ray")))
    shim.write_text(f'#!/bin/sh\nif [ "$1" = stop ]; then exec {stop}; fi\nexec {real} "$@"\n')
    shim.chmod(0o755)


def start(host, folder: Path, public_key: Path, env: Mapping[str, str]) -> SshHost:
    """sshd in the host's namespace on its address, root let in by public_key; the host's .bashrc
    puts folder/bin (the `ray` shim) first on PATH and exports env."""
    ssh_host = SshHost(host, folder / host.name)
    ssh_host.home.mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_host.folder / "host_key")],
                   check=True, capture_output=True, timeout=30)
    authorized_keys = ssh_host.folder / "authorized_keys"
    shutil.copyfile(public_key, authorized_keys)
    config = ssh_host.folder / "sshd_config"
    config.write_text(_CONFIG.format(address=host.address, folder=ssh_host.folder, authorized_keys=authorized_keys))
    etc = _etc(host)
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text(_with_root_field(Path("/etc/passwd").read_text(), 5, str(ssh_host.home)))
    # Root's password "*", not a locked "!...": without PAM, sshd refuses a locked account even a key.
    (etc / "shadow").touch(mode=0o600)
    (etc / "shadow").write_text(_with_root_field(Path("/etc/shadow").read_text(), 1, "*"))
    _write_ray_shim(folder / "bin")
    exports = [f'export PATH={shlex.quote(str(folder / "bin"))}:"$PATH"'] + \
        [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    (ssh_host.home / ".bashrc").write_text("\n".join(exports) + "\n")  # silent: rsync talks over this shell
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    try:
        subprocess.run(host.run([SSHD, "-f", str(config), "-E", str(ssh_host.folder / "sshd.log")]),
                       check=True, capture_output=True, timeout=30)  # returns once it listens
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        stop(ssh_host)
        raise
    return ssh_host


def stop(ssh_host: SshHost, timeout_s: float = 10) -> None:
    """SIGTERM to the host's sshd, back once it is gone, and the host's /etc/netns folder removed.
    Its open sessions are left alone."""
    shutil.rmtree(_etc(ssh_host.host), ignore_errors=True)
    pid = ssh_host.pid()
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running: neither gone nor a zombie (a daemon's reaper, PID 1, may take its time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _etc(host) -> Path:
    """Files that `ip netns exec` bind-mounts over /etc's for what it starts in the host."""
    return Path("/etc/netns") / host.namespace


def _with_root_field(table: str, index: int, value: str) -> str:
    """/etc/passwd or /etc/shadow with one field of root's line replaced."""
    lines = []
    for line in table.splitlines():
        fields = line.split(":")
        if fields[0] == "root":
            fields[index] = value
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def ssh(key: Path, host, command: str) -> list[str]:
    """argv running command on the host as root over SSH, in the host's environment (.bashrc)."""
    return ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"root@{host.address}", command]


def render_cluster_yaml(values: Mapping[str, str], template: Path = TEMPLATE) -> str:
    """The template with every {{name}} filled in."""
    text = template.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    assert "{{" not in text, f"{template} names a value not given: {text[text.index('{{'):][:40]}"
    return text


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        found.add(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return found


def stop_here(timeout_s: float = 15) -> int:
    """Kill every process of this network namespace but sshd and this command's own ancestry
    (the SSH session that runs it); SIGKILL, repeated while Ray forks as it dies."""
    namespace = subprocess.run(["ip", "netns", "identify"], capture_output=True, text=True).stdout.strip()
    if not namespace:
        print("stop-here: not in a named network namespace; nothing stopped", file=sys.stderr)
        return 1
    spared = _ancestors(os.getpid())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        victims = [pid for pid in map(int, listed) if pid not in spared and _comm(pid) not in ("sshd", "")]
        if not victims:
            return 0
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    print(f"stop-here: processes left in {namespace}", file=sys.stderr)
    return 1


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # gone
        return ""


if __name__ == "__main__":
    if sys.argv[1:] != ["stop-here"]:
        sys.exit("usage: ip netns exec <namespace> python scripts/netns_sshd.py stop-here")
    sys.exit(stop_here())
