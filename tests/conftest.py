"""Shared fixtures: the embedded SmolLM2 loaded once per session, and its transformers twin.

Loading either takes seconds on a 2-core machine, so every test that needs the real model shares
one copy; tests that need another KV-cache size build a new engine over the same weights.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
import torch

from tandem.models.loader import LoadedModel, load_model
from tandem.models.source import embedded_gguf_path, resolve_model
from tandem.workers.config import CacheConfig, EngineConfig
from tandem.workers.engine import LLMEngine
from tandem.workers.kv_cache_sizing import kv_cache_spec
from tandem.workers.llm import LLM
from tandem.workers.scheduler import SchedulerConfig
from tiny_models import TINY_LLAMA
from worker_processes import start_worker  # noqa: F401  (a fixture: worker processes for a test module)

# Tests start and stop several local Rays in a row on two busy cores; Ray's default 30 s wait for
# a new GCS to bind its port was once too short there.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

CPU = torch.device("cpu")
LAST_LOCAL_RAY_TEST = pytest.StashKey[str]()


@pytest.fixture(scope="module")
def local_ray() -> None:
    """The local Ray of tests/ray_serving.py, shared by the modules that ask for it: started here
    if it is not running, stopped after the last test that asks for it (pytest_runtest_teardown)."""
    from ray_serving import start_local_ray  # Ray only where a test needs it

    start_local_ray()


def pytest_collection_finish(session: pytest.Session) -> None:
    users = [item.nodeid for item in session.items if "local_ray" in item.fixturenames]
    if users:
        session.config.stash[LAST_LOCAL_RAY_TEST] = users[-1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield  # the item's fixtures are torn down: a module's pools are stopped before its Ray
    last = nextitem is None or item.nodeid == item.config.stash.get(LAST_LOCAL_RAY_TEST, None)
    if last and (ray_serving := sys.modules.get("ray_serving")) is not None:
        ray_serving.stop_local_ray()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A session cut short (-x, Ctrl-C) runs no teardown hook for its last tests."""
    if (ray_serving := sys.modules.get("ray_serving")) is not None:
        ray_serving.stop_local_ray()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model(None, dtype=torch.float32, device=CPU, show_progress=False)


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own load of the same GGUF file: the reference for token-exact tests."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(None)
    return AutoModelForCausalLM.from_pretrained(str(source.path), gguf_file=source.gguf_file, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer():
    """transformers' own tokenizer of the embedded GGUF file, converted from it (~3 s): a reference."""
    from transformers import AutoTokenizer

    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


LLMFactory = Callable[..., LLM]


@pytest.fixture(scope="session")
def make_llm(smollm2: LoadedModel) -> LLMFactory:
    """An LLM over the shared SmolLM2 weights with its own KV cache and scheduler limits."""

    def make(num_blocks: int = 512, block_size: int = 16, **scheduler: int) -> LLM:
        spec_bytes = kv_cache_spec(smollm2.config, block_size, torch.float32).bytes_per_block
        config = EngineConfig(
            cache=CacheConfig(block_size=block_size, num_bytes=num_blocks * spec_bytes),
            scheduler=SchedulerConfig(**scheduler),
        )
        return LLM.from_engine(LLMEngine(smollm2, config, CPU))

    return make





@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    """A random Llama saved as safetensors (no tokenizer: prompts are token ids), and the HF model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA, architectures=["LlamaForCausalLM"])).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(model_dir, safe_serialization=True)
    model.generation_config.eos_token_id = None  # the workers get ignore_eos
    return model_dir, model
