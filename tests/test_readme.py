"""Every ```python block of README.md and of the docs' pages runs, so they cannot drift from the API.

Each block runs on its own in a fresh namespace, compiled with its file's line
numbers (a failure points at the README or docs line). Words after ``python`` on
the opening fence (GitHub and the docs site do not render them) declare what a
block needs:

- ``needs=a,b``: names the block uses without defining, provided by the setups
  below (``model``, ``task_losses``, ``batch``, ``process_group``);
- ``requires=gradtools.Name``: an API the block documents that is not in this
  checkout yet; the block is skipped, with the reason shown, until it exists;
- ``not-run``: the block cannot run in a test (e.g. it needs ``torchrun``); it
  is still compiled, so at least its syntax is checked.

Any other word is an error, so a typo cannot skip a block silently.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The site's own pages (docs/_build is its output; included files are checked where they live).
DOCS_PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts
                    and p.name != "README.md")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    line: int  # line of the first code line in its file
    code: str
    needs: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    run: bool = True
    file: Path = README


def parse_info(info: str, where: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for word in info.split():
        key, _, value = word.partition("=")
        if key == "not-run" and not value:
            found["run"] = False
        elif key in ("needs", "requires") and value:
            found[key] = tuple(value.split(","))
        else:
            raise ValueError(f"{where}: unknown fence marker {word!r} (known: needs=, requires=, not-run)")
    return found


def readme_blocks(text: str, file: Path = README) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body")) + 1
        info = parse_info(match.group("info"), f"{file.name}:{line - 1}")
        blocks.append(Block(line, textwrap.dedent(match.group("body")), file=file, **info))
    return blocks


# --------------------------------------------------------------------------- setups for needs=


class ThreeHeads(nn.Module):
    """A shared trunk with the demo's three heads: 5 classes, one binary logit, a score."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.sst, self.para, self.sts = nn.Linear(16, 5), nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.trunk(x)
        return self.sst(h), self.para(h).squeeze(-1), self.sts(h).squeeze(-1)


@contextlib.contextmanager
def setup_model(names: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    torch.manual_seed(0)
    names["model"] = ThreeHeads()
    yield


@contextlib.contextmanager
def setup_batch(names: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    gen = torch.Generator().manual_seed(1)
    names["inputs"] = torch.randn(6, 8, generator=gen)
    names["labels_a"] = torch.randint(0, 5, (6,), generator=gen)
    names["labels_b"] = torch.randint(0, 2, (6,), generator=gen).float()
    names["labels_c"] = 5 * torch.rand(6, generator=gen)
    yield


@contextlib.contextmanager
def setup_task_losses(names: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    with setup_batch(names, tmp_path):
        sst, para, sts = names["model"](names["inputs"])
        names["loss_sst"] = F.cross_entropy(sst, names["labels_a"])
        names["loss_para"] = F.binary_cross_entropy_with_logits(para, names["labels_b"])
        names["loss_sts"] = F.mse_loss(sts, names["labels_c"])
        yield


@contextlib.contextmanager
def setup_process_group(names: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group, as torchrun would set up on one CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


SETUPS: dict[str, Callable[[dict[str, Any], Path], contextlib.AbstractContextManager[None]]] = {
    "process_group": setup_process_group,
    "model": setup_model,
    "batch": setup_batch,
    "task_losses": setup_task_losses,
}


# --------------------------------------------------------------------------- tests


def _present(dotted: str) -> bool:
    module, *attributes = dotted.split(".")
    try:
        value: Any = importlib.import_module(module)
    except ImportError:
        return False
    for attribute in attributes:
        if not hasattr(value, attribute):
            return False
        value = getattr(value, attribute)
    return True


def _where(block: Block) -> str:
    return f"{block.file.relative_to(ROOT).as_posix()}:{block.line}"


README_BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
BLOCKS = README_BLOCKS + [block for page in DOCS_PAGES
                          for block in readme_blocks(page.read_text(encoding="utf-8"), page)]


def test_readme_has_the_blocks_we_expect() -> None:
    assert len(README_BLOCKS) >= 2 and len(BLOCKS) >= 6
    assert sum(block.run for block in BLOCKS) >= 6  # not-run stays the exception
    for block in BLOCKS:
        assert set(block.needs) <= set(SETUPS), f"{_where(block)}: unknown needs {block.needs}"
    quickstart = [b for b in README_BLOCKS if "class TwoHeads" in b.code]
    assert quickstart and not quickstart[0].needs, "the quickstart must be self-contained"
    # The guides moved out of the README keep their blocks under test.
    assert {"multitask.md", "smart.md", "adamw.md", "aggregators.md"} <= {b.file.name for b in BLOCKS}


def test_markers_are_parsed_strictly() -> None:
    blocks = readme_blocks("```python needs=model not-run\nx = 1\n```\n"
                           "  ```python requires=gradtools.Nope\n  y = 2\n  ```\n")
    assert blocks == [Block(2, "x = 1\n", needs=("model",), run=False),
                      Block(5, "y = 2\n", requires=("gradtools.Nope",))]
    assert readme_blocks("```python\nz = 3\n```\n", ROOT / "docs" / "x.md")[0].file.name == "x.md"
    with pytest.raises(ValueError, match="unknown fence marker 'need=model'"):
        readme_blocks("```python need=model\nx = 1\n```\n")


@pytest.mark.parametrize("block", BLOCKS, ids=[_where(b) for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path, one_thread: None,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Line numbers in tracebacks are the file's own.
    code = compile("\n" * (block.line - 1) + block.code, str(block.file), "exec")
    if not block.run:
        return  # compiled above: the syntax is checked
    missing = [name for name in block.requires if not _present(name)]
    if missing:
        pytest.skip(f"{_where(block)} documents {missing}, not in this checkout yet")
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    names: dict[str, Any] = {"__name__": "__readme__"}
    with contextlib.ExitStack() as stack:
        # Setups in the order SETUPS lists them: a process group before the model, etc.
        for need in sorted(block.needs, key=list(SETUPS).index):
            stack.enter_context(SETUPS[need](names, tmp_path))
        exec(code, names)


def test_readme_shows_the_committed_ablation_table() -> None:
    # The README's ablation table is a copy of results/ablation/ablation.md's; a run
    # committed without refreshing the copy (scripts/readme_ablation.py) fails here.
    import runpy

    root = README.parent
    script = runpy.run_path(str(root / "scripts" / "readme_ablation.py"))
    table = (root / "results" / "ablation" / "ablation.md").read_text()
    block = script["table_block"](table)
    assert "| finetune baseline |" in block and block.count("\n|") >= 3
    readme = README.read_text()
    assert f"{script['BEGIN']}\n{block}\n{script['END']}" in readme
    assert script["main"](["--check"]) == 0  # what the docstring tells a contributor to run
    # A README holding another table is seen as different (the check can fail).
    stale = script["with_block"](readme, block.replace("| finetune baseline |", "| old |"))
    assert stale != readme and "| old |" in stale
