"""Copy the committed ablation's table into README.md, between its two markers.

    python scripts/readme_ablation.py          # rewrite README.md's block
    python scripts/readme_ablation.py --check  # exit 1 when README.md's block is stale

The block is the first table of results/ablation/ablation.md (dev scores, mean
± std over seeds, the paper's numbers beside) and its "Finished runs" and "Made
by" lines, so the README shows the numbers that are committed, not older ones.
tests/test_readme.py runs the check (a stale copy fails the suite).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TABLE = ROOT / "results" / "ablation" / "ablation.md"
BEGIN = "<!-- begin ablation table: scripts/readme_ablation.py copies it from results/ablation/ablation.md -->"
END = "<!-- end ablation table -->"


def table_block(ablation_md: str) -> str:
    """The scores table with its caption, and the progress and command lines."""
    lines = ablation_md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Dev scores"))
    stop = next(i for i in range(start + 2, len(lines)) if not lines[i].startswith("|"))
    kept = lines[start:stop]
    kept += [""] + [line for line in lines
                    if line.startswith(("Finished runs:", "Made by:"))]
    return "\n".join(kept)


def with_block(readme: str, block: str) -> str:
    head, found, rest = readme.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise SystemExit(f"{README}: the markers {BEGIN!r} and {END!r} are missing")
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str]) -> int:
    readme = README.read_text()
    updated = with_block(readme, table_block(TABLE.read_text()))
    if "--check" in argv:
        if updated != readme:
            print(f"{README} does not show {TABLE}'s table: run python scripts/readme_ablation.py")
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
