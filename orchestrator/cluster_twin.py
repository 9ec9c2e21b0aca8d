"""The local twin of a Ray cluster-launcher config (cluster.yaml): same node types, role
resources and commands, on Ray's `fake_multinode` provider, so the real autoscaler can be run on
one CPU machine:

    RAY_FAKE_CLUSTER=1 ray start --head --port 6379 --autoscaling-config=<twin>.yaml

Owns the translation only; it starts nothing. What changes from the cluster: the provider (fake
nodes are raylets on this machine, started by the autoscaler with the node type's resources), no
GPUs (GPU is dropped; the role resources such as tandem_context stay, so placement by role is
what the twin exercises), a small CPU count per node, min_workers 0 (a node appears only on
demand), empty node_config and docker (nothing to launch in a cloud), local file_mounts made
absolute (the autoscaler asserts they exist), node updaters off (a fake node has no SSH; the
autoscaler would mark it failed). Every other key stays, the setup and start commands included:
with updaters off they are carried, not executed.
Imports no torch and no Ray at module level.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

FAKE_HEAD_NODE_TYPE = "ray.head.default"  # the fake provider names its head node type so
DEFAULT_TWIN_CPUS = 1  # logical CPUs per fake node: every fake node is a raylet on this machine


class ClusterTwinError(ValueError):
    """A cluster config the twin cannot be made of; the message names the field."""


def make_twin(cluster: dict[str, Any], *, base_dir: Path, cpus_per_node: int = DEFAULT_TWIN_CPUS) -> dict[str, Any]:
    """The fake_multinode twin of a cluster-launcher config given as a dict.

    `base_dir` resolves relative local file_mounts (the directory `ray up` would run in).
    """
    from ray.autoscaler._private.util import prepare_config  # fills every top-level key, locally

    if cluster.get("head_node_type") != FAKE_HEAD_NODE_TYPE:
        raise ClusterTwinError(f"head_node_type: the fake provider's head is {FAKE_HEAD_NODE_TYPE!r}, "
                               f"got {cluster.get('head_node_type')!r}")
    full = prepare_config(copy.deepcopy(cluster))
    twin = {**full, "cluster_name": f"{full['cluster_name']}-twin", "docker": {},
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True}}
    twin["available_node_types"] = {
        name: _twin_node_type(name, node_type, cpus_per_node) for name, node_type in full["available_node_types"].items()
    }
    twin["file_mounts"] = {remote: str((base_dir / Path(local).expanduser()).resolve())
                           for remote, local in full["file_mounts"].items()}
    return twin


def _twin_node_type(name: str, node_type: dict[str, Any], cpus: int) -> dict[str, Any]:
    resources = node_type.get("resources")
    if not isinstance(resources, dict):
        raise ClusterTwinError(f"available_node_types.{name}.resources: the twin needs them explicit")
    twin_resources = {key: value for key, value in resources.items() if key not in ("GPU", "CPU")}
    twin = {key: value for key, value in node_type.items() if key not in ("docker", "node_config")}
    twin.update(node_config={}, resources={"CPU": cpus, **twin_resources})
    if name != FAKE_HEAD_NODE_TYPE:
        twin["min_workers"] = 0
    return twin


def write_twin(cluster_yaml: str | Path, out: str | Path, *, cpus_per_node: int = DEFAULT_TWIN_CPUS) -> dict[str, Any]:
    """Read cluster_yaml, write its twin to out; returns the twin."""
    path = Path(cluster_yaml)
    cluster = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cluster, dict):
        raise ClusterTwinError(f"{path}: expected a mapping, got {type(cluster).__name__}")
    twin = make_twin(cluster, base_dir=path.resolve().parent, cpus_per_node=cpus_per_node)
    Path(out).write_text(yaml.safe_dump(twin, sort_keys=False), encoding="utf-8")
    return twin
