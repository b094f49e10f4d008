"""Reading the small JSON files users may hand-edit (model, tokenizer and run configs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_object(
    path: str | os.PathLike[str], error: type[Exception] = ValueError, what: str = "a JSON object"
) -> dict[str, Any]:
    """The JSON object in ``path``; anything else raises ``error`` naming the file (and line)."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(values, dict):
        raise error(f"{path}: expected {what}")
    return values
