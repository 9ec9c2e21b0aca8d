"""What the tests over namespaced hosts share: scripts/netns_cluster.py (and netns_sshd.py) loaded
as modules, every process of a host found and killed by its namespace, and a skip, saying why,
where this machine cannot make network namespaces (no root, no iproute2)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (the scripts are no package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def netns_cluster() -> ModuleType:
    return load_script("netns_cluster")


def namespace_pids(namespace: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
    return [int(pid) for pid in listed.split()]


def kill_namespace(namespace: str, timeout: float = 15) -> None:
    """SIGKILL every process in the namespace, again while any is left (Ray forks while it dies)."""
    deadline = time.monotonic() + timeout
    while (pids := namespace_pids(namespace)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def skip_without_namespaces() -> None:
    try:
        probe = subprocess.run(["ip", "netns", "add", "tandem-probe"], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("cannot make network namespaces here: iproute2 (ip) is not installed")
    if probe.returncode != 0:
        pytest.skip(f"cannot make network namespaces here: {probe.stderr.strip() or 'ip netns add failed'}")
    subprocess.run(["ip", "netns", "del", "tandem-probe"], capture_output=True)
