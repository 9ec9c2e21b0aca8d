"""How one request wants its tokens chosen and when it stops. Validated on construction."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tandem.workers.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling and stopping. temperature 0 means greedy (the engine's default)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = field(default=())
    stop_token_ids: Sequence[int] = field(default=())
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token; 0 = chosen only
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple(self.stop, str, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, int, "stop_token_ids"))
        _require(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        _require(0.0 <= self.temperature <= 100.0, "temperature", "must be in [0, 100]")
        _require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 disables)")
        _require(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _require(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _require(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _require(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "must be in (0, 10]")
        _require(all(self.stop), "stop", "must not contain an empty string")
        _require(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"must be between 0 and {MAX_LOGPROBS}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _require(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise InvalidRequestError(f"invalid {name}: {rule}", field=name)


def _as_tuple(values: object, kind: type, name: str) -> tuple:
    if isinstance(values, (str, int)):
        values = (values,)
    try:
        items = tuple(values)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidRequestError(f"invalid {name}: must be a list", field=name) from None
    _require(all(isinstance(v, kind) for v in items), name, f"must be a list of {kind.__name__}")
    return items
