"""The Python blocks of docs/guides/shared-batch.md and weighting.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

GUIDES = Path(__file__).resolve().parent.parent / "docs" / "guides"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("name", ["shared-batch.md", "weighting.md"])
def test_guide_blocks_run(name: str, one_thread: None) -> None:
    blocks = BLOCK.findall((GUIDES / name).read_text())
    assert blocks, name
    for code in blocks:
        exec(compile(code, str(GUIDES / name), "exec"), {"__name__": "__guide__"})
