"""One seed of every gradtools aggregator and loss weighting on the demo, against finetune and
single-task SST.

    python scripts/sweep_aggregators.py [--out results/aggregator-sweep] [--seed 0]
        [--precision bf16] [--threads 1] [--table-only] [-- EXTRA TRAIN FLAGS]

Asks one question of the quick preset (issue 24, item 2): does any aggregator
close the SST gap between the multitask model and the single-task SST model?
Each run is ``python -m bert_demo train`` in its own folder ``OUT/<name>``
(``finetune``: no aggregator, the summed losses; ``single-sst``: SST alone;
``<name>``: ``--aggregator <name>``; ``weight-<name>``: ``--weighting <name>``, the
losses weighted by a :mod:`gradtools.weighting` method, then summed). A folder with a final.json is finished and
skipped, so the sweep continues where it stopped. Then ``OUT/sweep.md`` gets the
table: dev scores of each run's best weights, the SST gap to single-task SST,
and each row minus finetune with a 95% paired bootstrap over dev examples (one
seed: no interval over seeds, so a verdict here is a lead, not a result).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bert_demo.training.weighting import WEIGHTINGS
from gradtools.aggregation import available

BASELINES = {"finetune": [], "single-sst": ["--tasks", "sst"]}


def planned_runs() -> dict[str, list[str]]:
    """Run name -> the train flags that make it."""
    runs = dict(BASELINES)
    for name in sorted(available()):
        runs[name] = ["--aggregator", name]
    for name in WEIGHTINGS:
        runs[f"weight-{name}"] = ["--weighting", name]
    return runs


def train_command(name: str, flags: list[str], args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "bert_demo", "train", *flags, "--seed", str(args.seed),
            "--precision", args.precision, "--threads", str(args.threads), "--no-progress",
            "--out", str(args.out / name), *args.extra]


def run_missing(args: argparse.Namespace) -> None:
    for name, flags in planned_runs().items():
        if (args.out / name / "final.json").is_file():
            continue
        command = train_command(name, flags, args)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(command)}", flush=True)
        resume = ["--resume"] if (args.out / name / "config.json").is_file() else []
        done = subprocess.run(command + resume, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SystemExit(f"{name}: train exited with {done.returncode}")


def _best_dev(folder: Path) -> dict[str, float] | None:
    final = folder / "final.json"
    if not final.is_file():
        return None
    # The ablation's rule: best weights, trained tasks.
    from bert_demo.ablation.ablate import dev_scores

    return {k: float(v) for k, v in dev_scores(json.loads(final.read_text())).items()}


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _difference_cell(name: str, reference: str, metric: str, out: Path) -> str:
    from bert_demo.ablation.stats import Run, compare
    from bert_demo.run_folder.dev_predictions import read_dev_predictions

    runs = []
    for run_name in (name, reference):
        scores = _best_dev(out / run_name)
        assert scores is not None
        runs.append(Run(seed=0, dev=scores,
                        predictions=read_dev_predictions(out / run_name / "dev_predictions.csv.gz")))
    comparison = compare([runs[0]], [runs[1]]).get(metric)
    if comparison is None:
        return "—"
    if comparison.example_interval is None:
        return f"{comparison.mean:+.3f}"
    low, high = comparison.example_interval
    return f"{comparison.mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def write_table(args: argparse.Namespace) -> Path:
    scores = {name: _best_dev(args.out / name) for name in planned_runs()}
    single = scores.get("single-sst")
    lines = [
        "# Aggregator and loss-weighting sweep at the quick preset (one seed)",
        "",
        "Dev scores of each run's best weights (seed "
        f"{args.seed}, precision {args.precision}). 'SST gap' is the row's SST accuracy minus "
        "the single-task SST model's (negative: the multitask model is worse on SST), with a 95% "
        "paired bootstrap over dev examples. "
        "'vs finetune' is the row minus the finetune baseline with a 95% paired bootstrap over "
        "dev examples; one seed, so no interval over seeds: treat a difference as a lead.",
        "",
        "| run | SST acc | Quora acc | STS r | overall | SST gap | SST vs finetune | overall vs finetune |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, dev in scores.items():
        if dev is None:
            lines.append(f"| {name} | not finished | | | | | | |")
            continue
        gap = ("—" if single is None or "sst_acc" not in dev or name == "single-sst"
               else _difference_cell(name, "single-sst", "sst_acc", args.out))
        multitask = "para_acc" in dev and name != "finetune" and scores.get("finetune") is not None
        versus = [_difference_cell(name, "finetune", m, args.out) if multitask else "—"
                  for m in ("sst_acc", "overall")]
        lines.append(f"| {name} | {_cell(dev.get('sst_acc'))} | {_cell(dev.get('para_acc'))} | "
                     f"{_cell(dev.get('sts_pearson'))} | {_cell(dev.get('overall'))} | "
                     f"{gap} | "
                     f"{versus[0]} | {versus[1]} |")
    extra = f" -- {shlex.join(args.extra)}" if args.extra else ""
    lines += ["", "Made by: `python scripts/sweep_aggregators.py --out "
              f"{args.out} --seed {args.seed} --precision {args.precision} "
              f"--threads {args.threads}{extra}`", ""]
    path = args.out / "sweep.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/aggregator-sweep"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="bf16", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table-only", action="store_true", help="train nothing")
    parser.add_argument("extra", nargs="*", help="more train flags, after --")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        run_missing(args)
    print(write_table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
