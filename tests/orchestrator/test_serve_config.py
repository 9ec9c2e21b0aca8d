"""The serve YAML schema: defaults, a full round trip, and every bad field named with its path."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tandem.orchestrator.serve_config import ServeConfig, ServeConfigError, load_serve_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ServeConfigError) as info:
        load_serve_config(write(tmp_path, text))
    return str(info.value)


def test_an_empty_file_means_every_default(tmp_path: Path) -> None:
    config = load_serve_config(write(tmp_path, ""))
    assert config == ServeConfig()
    assert config.model is None and config.mode == "disaggregated"
    assert (config.pools.context.count, config.pools.generation.count, config.pools.aggregated.count) == (1, 1, 0)
    assert config.pools.context.block_size == 16 and config.pools.context.dtype == "auto"
    assert (config.router.policy, config.router.local_prefill_max_tokens, config.router.max_retries) == ("kv_aware", 64, 1)
    assert (config.limits.max_concurrent_requests, config.limits.request_timeout_s) == (256, 600.0)
    assert (config.server.host, config.server.port, config.server.api_key_env) == ("127.0.0.1", 8000, None)
    assert list(config.active_pools()) == ["context", "generation"]


def test_aggregated_mode_defaults_to_one_aggregated_worker(tmp_path: Path) -> None:
    config = load_serve_config(write(tmp_path, "mode: aggregated\n"))
    assert (config.pools.context.count, config.pools.generation.count, config.pools.aggregated.count) == (0, 0, 1)
    assert list(config.active_pools()) == ["aggregated"]
    assert ServeConfig(mode="aggregated") == config


FULL = """
model: /models/qwen3-8b
served_model_name: qwen3
mode: disaggregated
pools:
  context:
    count: 2
    num_cpus: 8
    num_gpus: 1
    device: cuda
    dtype: bfloat16
    kv_cache_bytes: 40000000000
    block_size: 32
    resources: {B200: 1}
  generation:
    count: 3
    num_cpus: 4
    num_gpus: 1
    dtype: bfloat16
    block_size: 32
  aggregated:
    count: 0
    tp_size: 2
router:
  policy: least_load
  local_prefill_max_tokens: 128
  max_retries: 2
limits:
  max_concurrent_requests: 1024
  max_model_len: 8192
  request_timeout_s: 120
server:
  host: 0.0.0.0
  port: 9000
  api_key_env: TANDEM_API_KEY
"""


def test_a_full_file_round_trips(tmp_path: Path) -> None:
    config = load_serve_config(write(tmp_path, FULL))
    assert config.model == "/models/qwen3-8b" and config.served_model_name == "qwen3"
    assert config.pools.context.count == 2 and config.pools.aggregated.tp_size == 2
    assert config.pools.context.resources == {"B200": 1.0} and config.pools.context.kv_cache_bytes == 40_000_000_000
    assert config.pools.generation.count == 3 and config.pools.generation.num_gpus == 1.0
    assert config.router.policy == "least_load" and config.limits.max_model_len == 8192
    assert config.server.port == 9000 and config.server.api_key_env == "TANDEM_API_KEY"
    dumped = write(tmp_path, yaml.safe_dump(config.model_dump(mode="json")))
    assert load_serve_config(dumped) == config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("pools:\n  context:\n    cuont: 2\n", "serve.yaml: pools.context.cuont: Extra inputs are not permitted"),
        ("routr:\n  policy: kv_aware\n", "serve.yaml: routr: Extra inputs are not permitted"),
        ("pools:\n  context:\n    count: -1\n",
         "serve.yaml: pools.context.count: Input should be greater than or equal to 0"),
        ("router:\n  policy: fastest\n",
         "serve.yaml: router.policy: Input should be 'round_robin', 'least_load' or 'kv_aware'"),
        ("limits:\n  request_timeout_s: 0\n", "serve.yaml: limits.request_timeout_s: Input should be greater than 0"),
        ("pools:\n  generation:\n    tp_size: 0\n", "serve.yaml: pools.generation.tp_size: Input should be greater"),
        ("pools:\n  context:\n    dtype: fp8\n", "serve.yaml: pools.context.dtype: Input should be 'auto'"),
        ("pools:\n  context:\n    resources: {B200: -1}\n",
         "serve.yaml: pools.context.resources.B200: Input should be greater than or equal to 0"),
        ("pools:\n  context:\n    tp_size: 4\n    num_gpus: 1\n",
         "serve.yaml: pools.context.num_gpus: tp_size 4 needs num_gpus >= 4"),
        ("server:\n  api_key_env: 'sk-123 456'\n", "serve.yaml: server.api_key_env: String should match pattern"),
        ("mode: aggregated\nautoscale: {policy: p.yaml, profile: q.json}\n",
         "serve.yaml: autoscale: the planner sizes context and generation pools: it needs mode: disaggregated"),
        ("autoscale: {policy: p.yaml}\n", "serve.yaml: autoscale.profile: Field required"),
    ],
)
def test_a_bad_field_is_named_with_its_path(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_pools_that_exchange_kv_must_agree_on_block_size_and_dtype(tmp_path: Path) -> None:
    message = error_of(tmp_path, "pools:\n  context: {block_size: 16}\n  generation: {block_size: 32}\n")
    assert message.endswith("serve.yaml: pools.generation.block_size: 32 differs from pools.context.block_size 16; the context and generation pools exchange KV blocks and must agree")
    message = error_of(tmp_path, "pools:\n  context: {dtype: float16}\n")
    assert "pools.generation.dtype: 'auto' differs from pools.context.dtype 'float16'" in message
    # aggregated mode exchanges no KV: the idle pools' settings do not matter
    config = load_serve_config(write(tmp_path, "mode: aggregated\npools:\n  generation: {block_size: 32}\n"))
    assert config.pools.aggregated.block_size == 16


def test_each_mode_needs_its_own_pools_and_only_those(tmp_path: Path) -> None:
    assert "serve.yaml: pools.generation.count: disaggregated mode needs at least 1 generation worker" in error_of(
        tmp_path, "pools:\n  generation: {count: 0}\n"
    )
    assert "serve.yaml: pools.aggregated.count: aggregated mode needs at least 1 aggregated worker" in error_of(
        tmp_path, "mode: aggregated\npools:\n  aggregated: {count: 0}\n"
    )
    assert "serve.yaml: pools.context.count: aggregated mode uses no context workers" in error_of(
        tmp_path, "mode: aggregated\npools:\n  context: {count: 1}\n"
    )
    assert "serve.yaml: mode: Input should be 'disaggregated' or 'aggregated'" in error_of(tmp_path, "mode: batch\n")


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "server:\n  port: 8000\n  host: [127.0.0.1\n")
    assert message.startswith(f"{tmp_path / 'serve.yaml'}: line ") and "invalid YAML" in message


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    assert "duplicate key 'port'" in error_of(tmp_path, "server:\n  port: 80\n  port: 81\n")


def test_a_file_that_is_not_a_mapping_or_missing_says_so(tmp_path: Path) -> None:
    assert "expected a mapping of settings, got list" in error_of(tmp_path, "- a\n- b\n")
    with pytest.raises(ServeConfigError, match="no-such.yaml: cannot read"):
        load_serve_config(tmp_path / "no-such.yaml")


def test_the_schema_module_does_not_import_torch() -> None:
    import subprocess

    code = "import tandem.orchestrator.serve_config, tandem.orchestrator.router, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_an_aggregated_tensor_parallel_pool_starts_workers_with_that_size(tmp_path: Path) -> None:
    from tandem.orchestrator.serve import worker_arguments

    config = load_serve_config(write(tmp_path, "mode: aggregated\npools:\n  aggregated: {tp_size: 2, device: cuda}\n"))
    args = worker_arguments(config, config.pools.aggregated)
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in worker_arguments(config, config.pools.context)


def test_context_and_generation_pools_may_differ_in_tensor_parallel_size(tmp_path: Path) -> None:
    """A hand-off re-splits the kv heads (kvtransfer/wire_blocks.py), so the two pools size apart."""
    from tandem.orchestrator.serve import worker_arguments

    config = load_serve_config(write(tmp_path, "pools:\n  context: {tp_size: 2}\n  generation: {tp_size: 4}\n"))
    for pool, size in ((config.pools.context, "2"), (config.pools.generation, "4")):
        args = worker_arguments(config, pool)
        assert args[args.index("--tensor-parallel-size") + 1] == size
