"""`ablate`: the paper's ten-row table, each row over N seeds.

Every run trains in its own folder ``OUT/<row>/seed<k>``; a run whose final.json
exists is skipped and one with only a checkpoint is resumed, so rerunning the
command continues where it stopped. The table (mean +- std over seeds, beside the
paper's numbers) goes to OUT/ablation.md, the numbers to OUT/ablation.json and a
bar chart to OUT/ablation.png.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bert_demo.config import TrainConfig
from bert_demo.run_dir import CHECKPOINT, FINAL
from bert_demo.tasks import PAPER_TASKS, TASKS


class TrainFunction(Protocol):
    """:func:`bert_demo.train.train` (the CLI passes it in; tests pass a stand-in)."""

    def __call__(self, config: TrainConfig, out_dir: Path, *, resume: bool,
                 device: str | None, progress: bool) -> Any: ...


@dataclass(frozen=True)
class Row:
    name: str
    slug: str  # its folder and its name for --rows
    overrides: dict[str, Any]
    aliases: tuple[str, ...] = ()  # older slugs, still accepted by --rows


ROWS: tuple[Row, ...] = (
    Row("single-task SST baseline", "single-sst", {"tasks": ("sst",)}),
    Row("pretrained baseline (frozen encoder)", "frozen", {"mode": "frozen"},
        aliases=("pretrain",)),
    Row("finetune baseline", "finetune", {}),
    Row("SMART", "smart", {"smart": True}),
    Row("PCGrad", "pcgrad", {"pcgrad": True}),
    Row("stsAug", "stsaug", {"sts_aug": True}),
    Row("SMART + PCGrad", "smart-pcgrad", {"smart": True, "pcgrad": True}),
    Row("SMART + stsAug", "smart-stsaug", {"smart": True, "sts_aug": True}),
    Row("PCGrad + stsAug", "pcgrad-stsaug", {"pcgrad": True, "sts_aug": True}),
    Row("SMART + PCGrad + stsAug", "all", {"smart": True, "pcgrad": True, "sts_aug": True}),
)

# The paper's three tasks' metrics and the overall score, as table columns.
METRICS = (*(TASKS[t].metric_name for t in PAPER_TASKS), "overall")
HEADERS = (*(TASKS[t].metric_title for t in PAPER_TASKS), "overall")

# The paper's dev numbers (bert-base, official Quora split) per row, when known.
# They could not be retrieved while this was written, so the column is left open
# rather than filled with guesses; fill it in from the paper's table.
PAPER_DEV_SCORES: dict[str, dict[str, float]] = {}


def row_config(base: TrainConfig, row: Row, seed: int) -> TrainConfig:
    """The base settings with the row's methods switched on (and only those)."""
    methods = {"smart": False, "pcgrad": False, "sts_aug": False, "mode": "finetune",
               "tasks": base.tasks}
    extra = {**base.extra, "ablation_row": row.name}
    return base.with_overrides(**{**methods, **row.overrides, "seed": seed, "extra": extra})


def select_rows(names: list[str] | None) -> tuple[Row, ...]:
    if names is None:
        return ROWS
    known = ({r.slug: r for r in ROWS} | {r.name: r for r in ROWS}
             | {alias: r for r in ROWS for alias in r.aliases})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {unknown}; rows are {[r.slug for r in ROWS]}")
    return tuple(known[n] for n in names)


def run_ablation(
    base: TrainConfig,
    out: Path,
    seeds: int,
    rows: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    *,
    train: TrainFunction,
) -> Path:
    """Train every (row, seed) not finished yet with ``train``, then write the table."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    selected = select_rows(rows)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for row in selected:
        for seed in range(seeds):
            run_dir = out / row.slug / f"seed{seed}"
            final_path = run_dir / FINAL
            if not final_path.is_file():
                config = row_config(base, row, seed)
                resume = (run_dir / CHECKPOINT).is_file()
                print(f"ablation: {row.name}, seed {seed} -> {run_dir}"
                      + (" (resuming)" if resume else ""))
                train(config, run_dir, resume=resume, device=device, progress=progress)
            results.setdefault(row.name, []).append(json.loads(final_path.read_text()))
    summary = summarize(results)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = out / "ablation.md"
    table.write_text(markdown_table(summary, base, seeds))
    plot(summary, out / "ablation.png")
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, finals in results.items():
        entry: dict[str, Any] = {"seeds": len(finals),
                                 "wall_s": statistics.fmean(f["wall_s"] for f in finals)}
        for metric in METRICS:
            mean, std = _mean_std([float(f["dev"][metric]) for f in finals])
            entry[metric] = {"mean": mean, "std": std}
        summary[name] = entry
    return summary


def _cell(stat: dict[str, float]) -> str:
    if math.isnan(stat["std"]):
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(summary: dict[str, Any], base: TrainConfig, seeds: int) -> str:
    lines = [
        f"Dev scores, mean ± std over {seeds} seed(s) (no ± with one seed). Paper: the "
        "report's dev numbers (bert-base, official 141k Quora split); '—' where not filled in.",
        "",
        "| row | " + " | ".join(HEADERS) + " | " + " | ".join(f"paper {h}" for h in HEADERS)
        + " | min/run |",
        "|---" * (1 + 2 * len(HEADERS) + 1) + "|",
    ]
    for name, entry in summary.items():
        ours = [_cell(entry[m]) for m in METRICS]
        known = PAPER_DEV_SCORES.get(name, {})
        paper = [f"{known[m]:.3f}" if m in known else "—"
                 for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(ours) + " | " + " | ".join(paper)
                     + f" | {entry['wall_s'] / 60:.1f} |")
    settings = {k: v for k, v in base.to_dict().items()
                if k not in ("smart", "pcgrad", "sts_aug", "mode", "seed", "extra")}
    lines += ["", "Settings shared by every row: `" + json.dumps(settings, sort_keys=True) + "`", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    # Any: the matplotlib type stubs here lag its real signatures.
    fig: Any
    ax: Any
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4.5))
    width = 0.8 / len(METRICS)
    for k, (metric, header) in enumerate(zip(METRICS, HEADERS, strict=True)):
        means = [summary[n][metric]["mean"] for n in names]
        stds = [summary[n][metric]["std"] for n in names]
        # One seed has no spread: draw no error bars rather than zero-length ones.
        errors = None if all(math.isnan(s) for s in stds) else [
            0.0 if math.isnan(s) else s for s in stds]
        xs = [i + (k - (len(METRICS) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=header)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("dev score")
    ax.legend(ncol=len(METRICS), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
