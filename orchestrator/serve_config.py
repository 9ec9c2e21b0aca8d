"""The schema of `tandem serve --config serve.yaml`: pydantic at the edge, every key checked.

Owns parsing and validation only; nothing here starts a worker. Unknown keys are errors (a typo
must not silently fall back to a default), and `load_serve_config` names the file and the field
path of every problem. Pool counts default by mode: one context and one generation worker when
disaggregated, one aggregated worker when aggregated.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tandem.orchestrator.yaml_schema import Section, field_error, load_yaml_model

Mode = Literal["disaggregated", "aggregated"]
PoolName = Literal["context", "generation", "aggregated"]

_MODE_POOLS: dict[str, tuple[PoolName, ...]] = {
    "disaggregated": ("context", "generation"),
    "aggregated": ("aggregated",),
}
# Pools whose workers READ each other's KV blocks: raw bytes only pair when these fields agree.
_KV_EXCHANGE: dict[str, tuple[PoolName, ...]] = {"disaggregated": ("context", "generation"), "aggregated": ()}
_KV_FIELDS = ("block_size", "dtype")


class ServeConfigError(Exception):
    """A serve config that cannot be read or does not validate; the message names file and field."""


class PoolConfig(Section):
    count: int = Field(0, ge=0)
    """Workers in this pool; left out, 1 for the pools the mode uses and 0 for the others."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves for each worker."""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs Ray reserves for each worker; None: tp_size when the cluster has GPUs, else 0."""
    tp_size: int = Field(1, ge=1)
    """Tensor-parallel degree of each worker (aggregated pools only, for now)."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights and KV cache; auto: bfloat16 on cuda, float32 on cpu."""
    kv_cache_bytes: int | None = Field(None, ge=1)
    """KV cache size of each worker; None: the worker's default for its device."""
    block_size: int = Field(16, ge=1)
    """Tokens per KV block."""
    resources: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    """Extra Ray custom resources each worker needs, e.g. {"B200": 1}."""

    @model_validator(mode="after")
    def _enough_gpus_for_tp(self) -> PoolConfig:
        if self.num_gpus is not None and self.tp_size > 1 and self.num_gpus < self.tp_size:
            raise field_error("num_gpus", f"tp_size {self.tp_size} needs num_gpus >= {self.tp_size}, got {self.num_gpus:g}")
        return self


class PoolsConfig(Section):
    context: PoolConfig = Field(default_factory=PoolConfig)
    """Workers that prefill prompts and hand their KV off."""
    generation: PoolConfig = Field(default_factory=PoolConfig)
    """Workers that decode (and prefill short uncached prompts themselves)."""
    aggregated: PoolConfig = Field(default_factory=PoolConfig)
    """Workers that prefill and decode every request themselves."""


class RouterConfig(Section):
    policy: Literal["round_robin", "least_load", "kv_aware"] = "kv_aware"
    """How requests pick workers (orchestrator/router.py)."""
    local_prefill_max_tokens: int = Field(64, ge=0)
    """A generation worker prefills a prompt itself when at most this many tokens are uncached there."""
    max_retries: int = Field(1, ge=0)
    """Times a request whose worker failed is retried on another one."""


class LimitsConfig(Section):
    max_concurrent_requests: int = Field(256, ge=1)
    """Requests in flight at once; more are refused with 429."""
    max_model_len: int | None = Field(None, ge=1)
    """Prompt plus completion tokens; None: the model's context length."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Wall-clock limit of one request."""
    max_request_bytes: int = Field(4 << 20, ge=1)
    """Largest request body; a larger one is refused with 413 before it is read, let alone tokenized."""
    request_body_timeout_s: float = Field(30.0, gt=0)
    """Time a request's whole body has to arrive; a slower one is refused with 408."""


class ServerConfig(Section):
    host: str = "127.0.0.1"
    """Interface the HTTP server binds to."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port; 0 picks a free one."""
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of the environment variable holding the API key; None: no authentication."""


class SecurityConfig(Section):
    """Who may call the workers (workers/cluster_auth.py). The token reaches the workers through
    Ray; the TLS files must exist at the same paths on every node."""

    cluster_token_file: str | None = None
    """File holding the cluster's shared token; None: $TANDEM_CLUSTER_TOKEN_FILE, else $TANDEM_CLUSTER_TOKEN, else none."""
    tls_cert: str | None = None
    """PEM certificate for mutual TLS between the orchestrator and workers (with tls_key and tls_ca)."""
    tls_key: str | None = None
    tls_ca: str | None = None


class AutoscaleConfig(Section):
    policy: str
    """The autoscaling policy YAML (orchestrator/autoscale_policy.py); a relative path is from the working directory."""
    profile: str
    """The worker profile JSON that `tandem profile` writes (orchestrator/planner_load.py WorkerProfile)."""


class ServeConfig(Section):
    model: str | None = None
    """HF checkpoint directory or .gguf file; `synthetic`: no model compute (benchmarks); None: the embedded SmolLM2."""
    served_model_name: str | None = Field(None, min_length=1)
    """The name clients put in `model`; None: derived from `model`."""
    mode: Mode = "disaggregated"
    """disaggregated: context and generation pools; aggregated: one pool that does both."""
    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    autoscale: AutoscaleConfig | None = None
    """The planner resizes the context and generation pools; None: the pool counts stay fixed."""

    @model_validator(mode="before")
    @classmethod
    def _default_counts_by_mode(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("mode", "disaggregated") not in _MODE_POOLS:
            return data  # field validation reports it
        pools = data.get("pools") or {}
        if not isinstance(pools, dict):
            return data
        used = _MODE_POOLS[data.get("mode", "disaggregated")]
        filled = {
            name: {"count": int(name in used), **pools.get(name, {})} if isinstance(pools.get(name, {}), dict) else pools[name]
            for name in ("context", "generation", "aggregated")
        }
        return {**data, "pools": {**pools, **filled}}

    @model_validator(mode="after")
    def _pools_fit_mode(self) -> ServeConfig:
        used = _MODE_POOLS[self.mode]
        for name in ("context", "generation", "aggregated"):
            count = getattr(self.pools, name).count
            if name in used and count < 1:
                raise field_error(f"pools.{name}.count", f"{self.mode} mode needs at least 1 {name} worker")
            if name not in used and count > 0:
                raise field_error(f"pools.{name}.count", f"{self.mode} mode uses no {name} workers; set count to 0")
        if self.autoscale is not None and self.mode != "disaggregated":
            raise field_error("autoscale", "the planner sizes context and generation pools: it needs mode: disaggregated")
        exchanging = _KV_EXCHANGE[self.mode]
        for first, name in ((exchanging[0], other) for other in exchanging[1:]):
            for key in _KV_FIELDS:
                want, got = getattr(getattr(self.pools, first), key), getattr(getattr(self.pools, name), key)
                if got != want:
                    raise field_error(
                        f"pools.{name}.{key}",
                        f"{got!r} differs from pools.{first}.{key} {want!r}; "
                        f"the {' and '.join(exchanging)} pools exchange KV blocks and must agree",
                    )
        return self

    def active_pools(self) -> dict[str, PoolConfig]:
        """The pools this mode starts, by name."""
        return {name: getattr(self.pools, name) for name in _MODE_POOLS[self.mode]}


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read and validate a serve YAML file; an empty file means every default."""
    return load_yaml_model(path, ServeConfig, ServeConfigError)
