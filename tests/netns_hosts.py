"""What the tests over namespaced hosts share: scripts/netns_cluster.py loaded as a module, and a
skip, saying why, where this machine cannot make network namespaces (no root, no iproute2)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "netns_cluster.py"


def netns_cluster() -> ModuleType:
    spec = importlib.util.spec_from_file_location("netns_cluster", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def skip_without_namespaces() -> None:
    try:
        probe = subprocess.run(["ip", "netns", "add", "tandem-probe"], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("cannot make network namespaces here: iproute2 (ip) is not installed")
    if probe.returncode != 0:
        pytest.skip(f"cannot make network namespaces here: {probe.stderr.strip() or 'ip netns add failed'}")
    subprocess.run(["ip", "netns", "del", "tandem-probe"], capture_output=True)
