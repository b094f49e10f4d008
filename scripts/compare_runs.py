"""Check that two bert_demo run folders logged the same numbers, bit for bit.

    python scripts/compare_runs.py RUN_A RUN_B

Compares every metrics.jsonl record and final.json, leaving out only wall-clock
fields (elapsed_s, wall_s) and final.json's copy of the settings. Used to show
that a code move changes no result: the same command before and after.
Exit status 0 when identical, 1 (with the first difference) otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WALL_CLOCK = ("elapsed_s", "wall_s")


def records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines]


def final(run: Path) -> dict[str, Any]:
    values = json.loads((run / "final.json").read_text())
    return {k: v for k, v in values.items() if k not in (*WALL_CLOCK, "config")}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (Path(x) for x in argv)
    ra, rb = records(a), records(b)
    if len(ra) != len(rb):
        print(f"{len(ra)} records in {a}, {len(rb)} in {b}")
        return 1
    for x, y in zip(ra, rb, strict=True):
        if x != y:
            print(f"records differ:\n  {a}: {x}\n  {b}: {y}")
            return 1
    if final(a) != final(b):
        print(f"final.json differs:\n  {a}: {final(a)}\n  {b}: {final(b)}")
        return 1
    print(f"identical: {len(ra)} metrics.jsonl records and final.json (dev {final(a)['dev']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
