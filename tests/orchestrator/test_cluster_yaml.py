"""cluster.yaml (Ray cluster launcher, AWS) is checked by Ray's own validation, agrees with the
serve config it starts, and its local twin (orchestrator/cluster_twin.py) runs under the real Ray
autoscaler here: an actor that asks for a role's resource makes it launch a fake node of that type.

Validation level: `ray up` runs `prepare_config` (AWS defaults.yaml merged, setup commands merged,
docker checked, per-type worker bounds filled: all local) and then, after the provider's
`fillout_available_node_types_resources` (which calls EC2 DescribeInstanceTypes, so is left out
here; cluster.yaml gives every type's resources itself), `validate_config` against
ray/autoscaler/ray-schema.json. These tests call the same two functions.
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from fake_cluster import CLUSTER_YAML, GCS_PORT, ROOT, port_free, processes_of, stop_ray_under
from ray_serving import stop_local_ray

from tandem.orchestrator.autoscale_policy import load_autoscale_policy
from tandem.orchestrator.cluster_twin import FAKE_HEAD_NODE_TYPE, write_twin
from tandem.orchestrator.serve import add_serve_arguments
from tandem.orchestrator.serve_config import load_serve_config

ROLES = {"context": "context_b200", "generation": "generation_gb200"}  # serve pool -> node type
LAUNCH_TIMEOUT_S = 90


def load_cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text(encoding="utf-8"))


def prepared() -> dict[str, Any]:
    config = prepare_config(load_cluster())
    validate_config(config)
    return config


def serve_command(config: dict[str, Any]) -> argparse.Namespace:
    """The `tandem serve` arguments of the head's start commands, parsed by tandem's own parser."""
    lines = [line for line in config["head_start_ray_commands"] if "tandem serve" in line]
    assert len(lines) == 1, config["head_start_ray_commands"]
    words = shlex.split(lines[0])
    words = words[words.index("tandem") + 2:]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(words[:next((i for i, w in enumerate(words) if w in (">", "&", "<")), len(words))])


def local_mount(config: dict[str, Any], remote: str) -> Path:
    """The local file that file_mounts copies to `remote` on the nodes."""
    for mount, local in config["file_mounts"].items():
        if remote.startswith(mount.rstrip("/") + "/"):
            return ROOT / local / remote[len(mount.rstrip("/")) + 1:]
    raise AssertionError(f"{remote} is not under any of file_mounts {sorted(config['file_mounts'])}")


def test_cluster_yaml_passes_ray_validation() -> None:
    config = prepared()
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert set(types) == {config["head_node_type"], *ROLES.values()}
    assert types["context_b200"]["node_config"]["InstanceType"] == "p6-b200.48xlarge"
    assert types["context_b200"]["resources"]["GPU"] == 8
    assert types["generation_gb200"]["node_config"]["InstanceType"] == "p6e-gb200.36xlarge"
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and not any(key.startswith("tandem_") for key in head["resources"])
    for pool, node_type in ROLES.items():  # each role resource: one per GPU, on its own node type only
        resources = types[node_type]["resources"]
        assert resources[f"tandem_{pool}"] == resources["GPU"]
        assert 0 <= types[node_type]["min_workers"] <= types[node_type]["max_workers"]
    # Every node runs the Ray this test validated with (mixed versions do not form a cluster).
    assert any(f'"ray[default]=={ray.__version__}"' in cmd for cmd in config["setup_commands"])
    assert any("tandem-serve" in cmd for cmd in config["setup_commands"])


@pytest.mark.parametrize("path, value, named", [
    (("available_node_types", "context_b200", "node_config"), None, "node_config"),  # required key gone
    (("available_node_types", "generation_gb200", "resources", "GPU"), "four", "GPU"),  # not an integer
    (("available_node_types", "context_b200", "max_workers"), 2.5, "max_workers"),
    (("available_node_types", "generation_gb200", "resources"), None, "resources"),
    (("idle_timeout_minutes",), "soon", "idle_timeout_minutes"),
])
def test_broken_copy_is_rejected_naming_the_field(path: tuple[str, ...], value: Any, named: str) -> None:
    broken = copy.deepcopy(load_cluster())
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError) as error:
        validate_config(prepare_config(broken))
    assert named in str(error.value)
    assert list(error.value.absolute_path) == list(path[:-1] if value is None else path)


def test_head_node_type_must_exist() -> None:
    broken = {**load_cluster(), "head_node_type": "head_cpu"}
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_head_starts_ray_and_tandem_serve_on_the_mounted_config() -> None:
    config = prepared()
    assert any("ray start --head --port=6379" in cmd for cmd in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in cmd for cmd in config["worker_start_ray_commands"])
    args = serve_command(config)
    assert args.address == "auto"
    serve_yaml = local_mount(config, args.config)
    assert serve_yaml == ROOT / "scripts/cluster/serve.yaml"
    assert load_serve_config(serve_yaml).mode == "disaggregated"
    # The autoscaling policy travels with it and validates (serve.yaml's autoscale.policy names it,
    # relative to ~/tandem-cluster, where the head starts `tandem serve`).
    assert any(cmd.startswith("cd ~/tandem-cluster && ") and "tandem serve" in cmd for cmd in config["head_start_ray_commands"])
    policy = load_autoscale_policy(local_mount(config, "~/tandem-cluster/autoscale.yaml"))
    serve = load_serve_config(serve_yaml)
    for name in ("context", "generation"):
        assert getattr(policy.pools, name).min_replicas <= getattr(serve.pools, name).count


def test_serve_pools_fit_the_node_types_that_tag_their_role() -> None:
    config = prepared()
    types = config["available_node_types"]
    serve = load_serve_config(local_mount(config, serve_command(config).config))
    policy = load_autoscale_policy(local_mount(config, "~/tandem-cluster/autoscale.yaml"))
    for pool_name, pool in serve.active_pools().items():
        offering = [name for name, t in types.items() if all(key in t["resources"] for key in pool.resources)]
        assert offering == [ROLES[pool_name]], f"pools.{pool_name}.resources {pool.resources} offered by {offering}"
        node = types[ROLES[pool_name]]["resources"]
        per_node = min(node[key] // amount for key, amount in pool.resources.items())
        assert per_node >= 1 and pool.num_gpus is not None and pool.num_gpus * per_node <= node["GPU"]
        assert pool.num_cpus * per_node <= node["CPU"]
        max_nodes = types[ROLES[pool_name]]["max_workers"]
        assert pool.count <= per_node * max_nodes, f"pools.{pool_name}.count {pool.count}"
        assert getattr(policy.pools, pool_name).max_replicas <= per_node * max_nodes, f"autoscale {pool_name}.max_replicas"


def test_twin_keeps_node_types_roles_and_commands(tmp_path: Path) -> None:
    from ray.autoscaler._private.monitor import BASE_READONLY_CONFIG

    config = prepared()
    twin = write_twin(CLUSTER_YAML, tmp_path / "twin.yaml")
    validate_config(twin)
    assert yaml.safe_load((tmp_path / "twin.yaml").read_text()) == twin
    assert set(BASE_READONLY_CONFIG) <= set(twin), "the autoscaler reads every top-level key of a local config"
    assert twin["provider"]["type"] == "fake_multinode" and twin["head_node_type"] == FAKE_HEAD_NODE_TYPE
    assert set(twin["available_node_types"]) == set(config["available_node_types"])
    for name, node_type in config["available_node_types"].items():
        roles = {k: v for k, v in node_type["resources"].items() if k not in ("CPU", "GPU")}
        twin_resources = twin["available_node_types"][name]["resources"]
        assert "GPU" not in twin_resources and {k: v for k, v in twin_resources.items() if k != "CPU"} == roles
        assert twin["available_node_types"][name]["max_workers"] == node_type["max_workers"]
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert twin[key] == config[key]
    assert all(Path(local).is_dir() for local in twin["file_mounts"].values())


def test_twin_autoscaler_launches_a_generation_node(tmp_path: Path) -> None:
    if not port_free(GCS_PORT):
        pytest.skip(f"port {GCS_PORT} is taken; the fake provider needs the GCS there")
    stop_local_ray()  # the one other test modules share: this process becomes a driver of the twin's
    if ray.is_initialized():
        pytest.skip("this process is connected to another Ray")
    twin = tmp_path / "twin.yaml"
    write_twin(CLUSTER_YAML, twin)
    temp_dir = tempfile.mkdtemp(prefix="tandem-twin-", dir="/tmp")  # short: Ray's socket paths live under it
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={GCS_PORT}", f"--autoscaling-config={twin}",
                        f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, text=True, timeout=120)
        # The GCS this test started, by address: `auto` could find another Ray on a shared machine.
        ray.init(address=f"{ray.util.get_node_ip_address()}:{GCS_PORT}", log_to_driver=False, configure_logging=False)
        head_ids = {node["NodeID"] for node in ray.nodes()}

        @ray.remote(num_cpus=0.01, resources={"tandem_generation": 1})
        class Probe:
            def node_id(self) -> str:
                return ray.get_runtime_context().get_node_id()

        asked = time.monotonic()
        probe = Probe.remote()
        node_id = ray.get(probe.node_id.remote(), timeout=LAUNCH_TIMEOUT_S)
        launched_s = time.monotonic() - asked
        nodes = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
        assert node_id not in head_ids, "the actor ran on the head, which offers no tandem_generation"
        assert nodes[node_id]["Resources"].get("tandem_generation") == 4
        assert "GPU" not in nodes[node_id]["Resources"]
        assert not any("tandem_context" in node["Resources"] for node in nodes.values()), "launched a context node unasked"
        ray.kill(probe)
        print(f"fake generation_gb200 node up {launched_s:.1f} s after the actor asked "
              f"({time.monotonic() - started:.1f} s with ray start)")
    finally:
        ray.shutdown()
        stop_ray_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not processes_of(temp_dir), "processes of the twin's Ray outlived the test"
