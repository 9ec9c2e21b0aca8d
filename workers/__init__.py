"""The worker engine: scheduler, model runner, sampler, and the Python LLM API.

`from tandem.workers import LLM, SamplingParams` is the public entry point; the rest loads lazily
so that importing the package stays cheap for callers that only need its types.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.workers.llm import LLM
    from tandem.workers.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from tandem.workers.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tandem.workers.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
