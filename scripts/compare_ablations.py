"""Paired differences between the same rows of two ablation folders.

    python scripts/compare_ablations.py A B [--seeds 3] [--rows finetune smart ...]

For every row both folders have finished (same seeds), A minus B per metric with
the ablation's two 95% intervals (over seeds and a bootstrap over dev examples),
as a markdown table. Made to ask whether a setting that every row shares (e.g.
``--precision bf16`` in A against fp32 in B) moves the scores: run
``ablate --out A`` with it, then compare against the committed ablation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bert_demo.ablation.ablate import differences_table, load_runs, select_rows
from bert_demo.ablation.stats import compare


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="ablation folder whose rows are compared")
    parser.add_argument("b", type=Path, help="ablation folder they are compared against")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    parser.add_argument("--rows", nargs="+", default=None, help="row slugs (default: all)")
    args = parser.parse_args(argv)
    for folder in (args.a, args.b):
        if not folder.is_dir():
            parser.error(f"{folder}: no such folder")
    try:
        rows = select_rows(args.rows)
    except ValueError as e:
        parser.error(str(e))
    differences = {}
    for row in rows:
        a = [run for run, _ in load_runs(args.a, row, args.seeds)]
        b = [run for run, _ in load_runs(args.b, row, args.seeds)]
        comparisons = compare(a, b) if a and b else {}
        if comparisons:
            differences[row.name] = comparisons
    if not differences:
        print(f"{args.a} and {args.b} share no finished (row, seed)", file=sys.stderr)
        return 1
    print(f"# {args.a} against {args.b}\n")
    print(differences_table(differences, reference=f"same row in {args.b}"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
