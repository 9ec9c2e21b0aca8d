"""What every YAML file Tandem reads shares: strict pydantic sections, a loader that refuses a key
given twice, and errors that name the file and the field path (or the line of a syntax error).

serve.yaml (orchestrator/serve_config.py) and the autoscaling policy
(orchestrator/autoscale_policy.py) are both read through `load_yaml_model`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

ModelT = TypeVar("ModelT", bound=BaseModel)


class Section(BaseModel):
    """A strict, frozen section: unknown keys are errors (a typo must not fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def field_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field error; ``field`` (relative to the validated model) is joined to its location."""
    return PydanticCustomError("tandem_config", message, {"field": field})


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _location(error: dict[str, Any]) -> str:
    parts = [str(part) for part in error["loc"]]
    field = (error.get("ctx") or {}).get("field")
    return ".".join(parts + ([field] if field else [])) or "(top level)"


def load_yaml_model(path: str | Path, model: type[ModelT], error: type[Exception]) -> ModelT:
    """Read ``path`` and validate it as ``model``; any problem raises ``error`` naming the file
    and the field path (or line and column). An empty file is an empty mapping."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{name}: cannot read: {e.strerror or e}") from e
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise error(f"{name}: {where}invalid YAML: {problem}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{name}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error("\n".join(f"{name}: {_location(err)}: {err['msg']}" for err in e.errors())) from e
