"""Reading a JSON Lines file (bench prompts, simulator traces): one object a line, errors that
name the file and the line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path, error: type[Exception]) -> list[tuple[str, Any]]:
    """(``"<path> line N"``, parsed value) for every non-blank line; ``error`` names a file that
    cannot be read or a line that is not JSON."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {path}: {e}") from e
    parsed = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            parsed.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise error(f"{path} line {number}: not JSON ({e.msg})") from e
    return parsed
