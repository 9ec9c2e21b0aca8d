"""Fixtures of the worker tests that more than one module asks for."""
from __future__ import annotations

import pytest
from grpc_fuzz_support import start_pair


@pytest.fixture(scope="module")
def fuzz_pair(start_worker, tiny_llama):
    """One context and one generation worker of a tiny random Llama, for a fuzz test module."""
    return start_pair(start_worker, tiny_llama)
