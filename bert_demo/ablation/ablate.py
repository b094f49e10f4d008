"""`ablate`: the paper's ten-row table and two rows beyond it, each row over N seeds.

``--rows`` may also name a row for any gradtools aggregator, ``agg-<name>`` (the
finetune baseline with ``--aggregator <name>``), or loss weighting,
``weight-<name>`` (with ``--weighting <name>``); see :func:`method_rows`.

Every run trains in its own folder ``OUT/<row>/seed<k>``; a run whose final.json
exists is skipped and one with only a checkpoint is resumed, so rerunning the
command continues where it stopped. ``--jobs N`` trains N runs at once in
separate processes that split the threads; a run that fails does not stop the
others, and ablate exits non-zero afterwards naming it. The table (mean +- std
over seeds, the paper's numbers beside, paired differences against the finetune
baseline and what they say about the report's conclusions) goes to
OUT/ablation.md, the numbers to OUT/ablation.json and the paired differences,
drawn with both their intervals, to OUT/differences.png
(:mod:`bert_demo.ablation.figure`).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bert_demo.ablation.conclusions import conclusions
from bert_demo.ablation.stats import Comparison, Run, compare
from bert_demo.config import TrainConfig
from bert_demo.run_folder.folder import RunFolder, changed_settings
from bert_demo.run_folder.run_dir import resolve_device
from bert_demo.run_folder.safe_write import write_text
from bert_demo.tasks import PAPER_TASKS, TASKS
from bert_demo.training.speed import resolve_precision, threads_for_jobs
from bert_demo.training.weighting import WEIGHTINGS
from gradtools.aggregation import available as available_aggregators
from gradtools.aggregation import from_name as aggregator_from_name


class TrainFunction(Protocol):
    """:func:`bert_demo.training.train.train` (the CLI passes it in; tests pass a stand-in)."""

    def __call__(self, config: TrainConfig, out_dir: Path, *, resume: bool,
                 device: str | None, progress: bool) -> Any: ...


class AblationFailed(RuntimeError):
    """Some runs failed; the others finished and the table covers them."""


@dataclass(frozen=True)
class Row:
    name: str
    slug: str  # its folder and its name for --rows
    overrides: dict[str, Any]
    aliases: tuple[str, ...] = ()  # older slugs, still accepted by --rows


PAPER_ROWS: tuple[Row, ...] = (
    Row("single-task SST baseline", "single-sst", {"tasks": ("sst",)}),
    Row("pretrained baseline (frozen encoder)", "frozen", {"mode": "frozen"},
        aliases=("pretrain",)),
    Row("finetune baseline", "finetune", {}),
    Row("SMART", "smart", {"smart": True}),
    Row("PCGrad", "pcgrad", {"aggregator": "pcgrad"}),
    Row("stsAug", "stsaug", {"sts_aug": True}),
    Row("SMART + PCGrad", "smart-pcgrad", {"smart": True, "aggregator": "pcgrad"}),
    Row("SMART + stsAug", "smart-stsaug", {"smart": True, "sts_aug": True}),
    Row("PCGrad + stsAug", "pcgrad-stsaug", {"aggregator": "pcgrad", "sts_aug": True}),
    Row("SMART + PCGrad + stsAug", "all",
        {"smart": True, "aggregator": "pcgrad", "sts_aug": True}),
)
# Beyond the paper: its future work, MNRL (see bert_demo.training.mnrl) on top of its best
# combination, and another gradient aggregator in PCGrad's place.
MNRL_ROW_WEIGHT = 0.5  # not tuned: MNRL starts near log(batch) ~ 2.8, BCE near 0.7
ROW_AGGREGATOR = "upgrad"  # gradtools.aggregation's UPGrad (Quinton & Rey 2024)
ROW_AGGREGATOR_NAME = "UPGrad"
EXTRA_ROWS: tuple[Row, ...] = (
    Row("+MNRL (SMART + PCGrad + stsAug + MNRL)", "all-mnrl",
        {"smart": True, "aggregator": "pcgrad", "sts_aug": True,
         "mnrl_weight": MNRL_ROW_WEIGHT}),
    Row(f"SMART + {ROW_AGGREGATOR_NAME} + stsAug", f"smart-{ROW_AGGREGATOR}-stsaug",
        {"smart": True, "aggregator": ROW_AGGREGATOR, "sts_aug": True}),
)
ROWS = PAPER_ROWS + EXTRA_ROWS

# Rows asked for by name only (--rows), one per method: the finetune baseline with it.
AGGREGATOR_ROW = "agg-"
WEIGHTING_ROW = "weight-"


def method_rows() -> tuple[Row, ...]:
    """``agg-<name>`` for every registered aggregator (named as its class: "UPGrad",
    "AlignedMTL") and ``weight-<name>`` for every loss weighting ("Uncertainty
    weighting"). An aggregator that a fixed row already runs alone (PCGrad) is that row,
    with ``agg-<name>`` as an alias, so its runs are not trained twice."""
    rows: list[Row] = []
    for name in available_aggregators():
        overrides = {"aggregator": name}
        if any(row.overrides == overrides for row in ROWS):
            continue
        rows.append(Row(type(aggregator_from_name(name)).__name__, AGGREGATOR_ROW + name,
                        overrides))
    for name, (_, title) in WEIGHTINGS.items():
        rows.append(Row(title, WEIGHTING_ROW + name, {"weighting": name}))
    return tuple(rows)


def _rows_by_name() -> dict[str, Row]:
    """Every row --rows accepts, by slug, table name, alias and agg-/weight- name."""
    every = ROWS + method_rows()
    known = ({r.slug: r for r in every} | {r.name: r for r in every}
             | {alias: r for r in every for alias in r.aliases})
    for row in ROWS:  # agg-pcgrad: the paper's PCGrad row
        aggregator = row.overrides.get("aggregator")
        if aggregator is not None and row.overrides == {"aggregator": aggregator}:
            known[AGGREGATOR_ROW + aggregator] = row
    return known

# The paper's three tasks' metrics and the overall score, as table columns.
METRICS = (*(TASKS[t].metric_name for t in PAPER_TASKS), "overall")
HEADERS = (*(TASKS[t].metric_title for t in PAPER_TASKS), "overall")

# The report's numbers (../shared/paper-results.md, section 4.4 of the report):
# bert-base-uncased, official CS224N splits, one run per row. Empty cells there
# are absent here; only three rows went to the test set.
PAPER_DEV_SCORES: dict[str, dict[str, float]] = {
    "single-sst": {"sst_acc": 0.515},
    "frozen": {"sst_acc": 0.404, "para_acc": 0.550, "sts_pearson": 0.223},
    "finetune": {"sst_acc": 0.511, "para_acc": 0.750, "sts_pearson": 0.345},
    "smart": {"sst_acc": 0.502, "para_acc": 0.759, "sts_pearson": 0.371},
    "pcgrad": {"sst_acc": 0.500, "para_acc": 0.760, "sts_pearson": 0.352},
    "stsaug": {"sst_acc": 0.489, "para_acc": 0.768, "sts_pearson": 0.352},
    "smart-pcgrad": {"sst_acc": 0.510, "para_acc": 0.758, "sts_pearson": 0.360},
    "smart-stsaug": {"sst_acc": 0.524, "para_acc": 0.774, "sts_pearson": 0.343},
    "pcgrad-stsaug": {"sst_acc": 0.499, "para_acc": 0.757, "sts_pearson": 0.360},
    "all": {"sst_acc": 0.525, "para_acc": 0.752, "sts_pearson": 0.375},
}
PAPER_TEST_SCORES: dict[str, dict[str, float]] = {
    "smart-pcgrad": {"sst_acc": 0.525, "para_acc": 0.762, "sts_pearson": 0.336},
    "smart-stsaug": {"sst_acc": 0.512, "para_acc": 0.779, "sts_pearson": 0.331},
    "all": {"sst_acc": 0.520, "para_acc": 0.755, "sts_pearson": 0.334},
}
REFERENCE_ROW = "finetune"  # what every row's paired differences are against

COMPARABILITY = (
    "Paper: the report's dev numbers (bert-base-uncased, 110M parameters, through the "
    "students' minBERT; official CS224N splits with 141,506 Quora training pairs; one run "
    "per row, the checkpoint with the best overall dev score). Ours: MiniLM-L6-H384 (22M "
    "parameters), a reduced Quora split (16,000 training and 2,000 dev pairs cut from the "
    "official dev file), like the paper the weights with the best overall dev score of each "
    "run (best.safetensors), mean ± std over seeds. Levels are not comparable (other "
    "encoder; Quora also another split); compare the differences between rows. The paper's overall (*) is computed here from its three numbers with the "
    "leaderboard formula, mean(SST, Quora, (r + 1) / 2); '—' where the report gives no number."
)


def row_config(base: TrainConfig, row: Row, seed: int) -> TrainConfig:
    """The base settings with the row's methods switched on (and only those)."""
    methods = {"smart": False, "sts_aug": False, "mnrl_weight": 0.0,
               "aggregator": None, "weighting": None, "mode": "finetune", "tasks": base.tasks}
    extra = {**base.extra, "ablation_row": row.name}
    return base.with_overrides(**{**methods, **row.overrides, "seed": seed, "extra": extra})


def select_rows(names: list[str] | None) -> tuple[Row, ...]:
    if names is None:
        return ROWS
    known = _rows_by_name()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"--rows: unknown row(s) {unknown}; rows are {[r.slug for r in ROWS]}, "
            f"{AGGREGATOR_ROW}<aggregator> for any of {available_aggregators()} and "
            f"{WEIGHTING_ROW}<weighting> for any of {list(WEIGHTINGS)}")
    return tuple(known[n] for n in names)


def check_rows(base: TrainConfig, rows: tuple[Row, ...]) -> None:
    """Refuse, before anything trains, a row whose method cannot run on ``base`` (a
    weighting with --tasks sst, ...), naming the row."""
    for row in rows:
        try:
            row_config(base, row, 0)
        except ValueError as error:
            raise ValueError(f"--rows {row.slug}: {error}") from None


@dataclass(frozen=True)
class _Job:
    row: Row
    seed: int
    folder: Path
    resume: bool


def _train_job(train: TrainFunction, config: TrainConfig, job: _Job, device: str | None,
               progress: bool) -> str | None:
    """Train one run; the error message if it failed (so one failure stops no other run)."""
    try:
        train(config, job.folder, resume=job.resume, device=device, progress=progress)
    except Exception as error:  # reported with the run's name once all runs are done
        return f"{type(error).__name__}: {error}"
    return None


def _set_worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_ablation(
    base: TrainConfig,
    out: Path,
    seeds: int,
    rows: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    *,
    train: TrainFunction,
    jobs: int = 1,
    threads: int = 1,
    command: str | None = None,
    table_only: bool = False,
) -> Path:
    """Train every (row, seed) not finished yet with ``train``, then write the table.

    ``jobs > 1`` trains that many runs at once in spawned processes with
    ``threads // jobs`` torch threads each (``train`` must then be importable, like
    bert_demo.training.train.train). Raises :class:`AblationFailed` after writing the table
    of the finished runs when some run failed.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    selected = select_rows(rows)
    if not table_only:
        check_rows(base, selected)
    out.mkdir(parents=True, exist_ok=True)
    # Every run already there (finished, or to be resumed) must have this ablation's settings.
    check_same_settings(base, out, selected, seeds)
    pending = [] if table_only else [
        _Job(row, seed, run_folder(out, row, seed).path,
             run_folder(out, row, seed).has_checkpoint())
        # Seed-major, so an ablation stopped part-way has every row at the first seeds.
        for seed in range(seeds) for row in selected
        if not run_folder(out, row, seed).is_finished()
    ]
    if pending:
        check_one_precision(out, base.precision, device)
    failed: list[str] = []

    def report(job: _Job, error: str | None) -> None:
        if error is not None:
            failed.append(f"{job.row.slug}/seed{job.seed} ({error})")
            print(f"ablation: {job.row.name}, seed {job.seed} FAILED: {error}")

    for job in pending:
        print(f"ablation: {job.row.name}, seed {job.seed} -> {job.folder}"
              + (" (resuming)" if job.resume else ""))
    if jobs == 1 or len(pending) <= 1:
        for job in pending:
            config = row_config(base, job.row, job.seed)
            report(job, _train_job(train, config, job, device, progress))
    else:
        each = threads_for_jobs(jobs, threads)
        print(f"ablation: {min(jobs, len(pending))} runs at a time, {each} thread(s) each")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_set_worker_threads, initargs=(each,)) as pool:
            # Progress bars of parallel runs would overwrite each other: none.
            futures = [(job, pool.submit(_train_job, train, row_config(base, job.row, job.seed),
                                         job, device, False)) for job in pending]
            for job, future in futures:
                report(job, future.result())
    table = write_outputs(base, out, selected, seeds, command)
    if failed:
        raise AblationFailed(f"{len(failed)} ablation run(s) failed: " + "; ".join(failed)
                             + f". The table {table} covers the finished runs; rerun the same "
                             "command to retry the failed ones.")
    return table


def run_folder(out: Path, row: Row, seed: int) -> RunFolder:
    return RunFolder(out / row.slug / f"seed{seed}")


# Settings a run's own config may differ in from its row's: the free-form notes (the row's
# name, which may have been reworded), and --precision as asked (auto, bf16, fp32), which
# check_one_precision compares as it resolved (final.json's "precision").
NOT_COMPARED = ("extra", "precision")


def check_same_settings(base: TrainConfig, out: Path, rows: tuple[Row, ...], seeds: int) -> None:
    """Refuse runs in ``out`` trained with other settings than ``base`` gives their row and
    seed: averaging them into one cell, under a table that names ``base``'s settings,
    would report numbers of settings nobody asked for."""
    for seed in range(seeds):
        for row in rows:
            folder = run_folder(out, row, seed)
            if not folder.holds_run():
                continue
            saved, expected = folder.saved_config(), row_config(base, row, seed)
            changed = changed_settings(saved, expected, ignore=NOT_COMPARED)
            if changed:
                shown = ", ".join(f"{k} {_shown(getattr(expected, k))} (the run has "
                                  f"{_shown(getattr(saved, k))})" for k in changed)
                raise ValueError(
                    f"--out {out}: {folder.path} was trained with other settings than this "
                    f"ablation gives it: {shown}. Pass the settings it was trained with, or "
                    "another --out")


def _shown(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def finished_precisions(out: Path) -> set[str]:
    """The precisions the finished runs in ``out`` trained in (as their final.json says)."""
    found = set()
    for folder in sorted(out.glob("*/seed*")):
        run = RunFolder(folder)
        if run.is_finished():
            precision = run.final().get("precision")
            if precision is not None:
                found.add(precision)
    return found


def check_one_precision(out: Path, requested: str, device: str | None) -> None:
    """Refuse to add runs of one precision to an ablation whose runs trained in another.

    ``--precision auto`` resolves per machine, so an ablation begun in fp32 on a CPU
    without bf16 units and continued on one with them would mix fp32 and bf16 runs in
    one table, and its paired differences would partly measure the precision.
    """
    finished = finished_precisions(out)
    if not finished:
        return
    new = resolve_precision(requested, resolve_device(device), quiet=True)
    if finished != {new}:
        shown = " and ".join(sorted(finished))
        raise ValueError(
            f"--out {out}: its finished runs trained in {shown}, but --precision {requested} "
            f"trains new runs in {new} here; pass --precision {min(finished)} to continue "
            "this ablation, or another --out to start one in " + new)


def dev_scores(final: dict[str, Any]) -> dict[str, float]:
    """A run's dev scores as the table reports them: those of its best weights.

    The paper kept the checkpoint with the best overall dev score, so the table does
    too (final.json's ``best``, the weights dev_predictions.csv.gz was computed from);
    runs written before best weights existed, or whose every evaluation was NaN,
    fall back to the last evaluation (``dev``). Tasks the run did not train are left
    out, and then so is the overall score.
    """
    best = final.get("best")
    scores: dict[str, float] = best["dev"] if best else final["dev"]
    # A task the run did not train has an untrained head: its dev score (and an
    # overall that averages it in) says nothing about the row, so it is left out.
    trained = final.get("config", {}).get("tasks", PAPER_TASKS)
    untrained = [TASKS[t].metric_name for t in PAPER_TASKS if t not in trained]
    if untrained:
        scores = {m: v for m, v in scores.items() if m not in (*untrained, "overall")}
    return scores


def load_runs(out: Path, row: Row, seeds: int) -> list[tuple[Run, dict[str, Any]]]:
    """The finished runs of ``row`` among seeds 0..seeds-1, with their final.json."""
    runs = []
    for seed in range(seeds):
        folder = run_folder(out, row, seed)
        if not folder.is_finished():
            continue
        final = folder.final()
        # A finished run without its weights (a committed ablation) is still finished: its
        # predictions file is taken as its best weights'.
        runs.append((Run(seed, dev_scores(final), folder.final_predictions()), final))
    return runs


def write_outputs(base: TrainConfig, out: Path, rows: tuple[Row, ...], seeds: int,
                  command: str | None = None) -> Path:
    """ablation.md, ablation.json and differences.png from the finished runs in ``out``."""
    finished = {row.slug: load_runs(out, row, seeds) for row in rows}
    finals = {row.name: [f for _, f in finished[row.slug]] for row in rows
              if finished[row.slug]}
    runs = {slug: [r for r, _ in pairs] for slug, pairs in finished.items() if pairs}
    summary = summarize(finals)
    reference = runs.get(REFERENCE_ROW, [])
    differences: dict[str, dict[str, Comparison]] = {}
    for row in rows:
        if row.slug in runs and row.slug != REFERENCE_ROW and reference:
            differences[row.name] = compare(runs[row.slug], reference)
    for row in rows:
        if row.name in summary:
            summary[row.name]["slug"] = row.slug
            summary[row.name]["paper_dev"] = PAPER_DEV_SCORES.get(row.slug, {})
            summary[row.name]["paper_test"] = PAPER_TEST_SCORES.get(row.slug, {})
            if row.name in differences:
                summary[row.name]["vs_finetune"] = {
                    m: c.to_dict() for m, c in differences[row.name].items()}
    found = conclusions(runs)
    document = {"rows": summary,
                "conclusions": [{"number": c.number, "claim": c.claim, "status": c.status,
                                 "evidence": c.evidence} for c in found]}
    # Whole or not at all, and never through a link the folder holds (see safe_write).
    write_text(out / "ablation.json", json.dumps(document, indent=2) + "\n")
    table = out / "ablation.md"
    text = markdown_table(summary, base, seeds)
    text += progress_section(finals, len(rows) * seeds, command)
    text += differences_table(differences)
    text += conclusions_section(found)
    write_text(table, text)
    # Imported here: bert_demo.ablation.figure imports this module's paper numbers.
    from bert_demo.ablation.figure import DIFFERENCES_FIGURE, plot_differences

    plot_differences(summary, out / DIFFERENCES_FIGURE, title=f"{out.name}: row − finetune "
                     "baseline on dev, mean over the seeds both ran")
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
            scores = [dev_scores(f) for f in finals]
            values = [float(s[metric]) for s in scores if metric in s]
            if values:
                mean, std = _mean_std(values)
                entry[metric] = {"mean": mean, "std": std}
        summary[name] = entry
    return summary


def _cell(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "—"
    if math.isnan(stat["std"]):
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def paper_overall(scores: dict[str, float]) -> float | None:
    """The leaderboard's overall from the report's three numbers (None if one is missing)."""
    if not all(m in scores for m in ("sst_acc", "para_acc", "sts_pearson")):
        return None
    return (scores["sst_acc"] + scores["para_acc"] + (scores["sts_pearson"] + 1) / 2) / 3


def _paper_cells(scores: dict[str, float]) -> list[str]:
    cells = [f"{scores[m]:.3f}" if m in scores else "—" for m in METRICS[:3]]
    total = paper_overall(scores)
    return [*cells, "—" if total is None else f"{total:.3f}*"]


def markdown_table(summary: dict[str, Any], base: TrainConfig, seeds: int) -> str:
    slugs = {r.name: r.slug for r in ROWS}
    lines = [
        f"Dev scores, mean ± std over the seeds each row has finished (of {seeds} planned; "
        "no ± with one seed).",
        "",
        "| row | " + " | ".join(HEADERS) + " | " + " | ".join(f"paper {h}" for h in HEADERS)
        + " | seeds | min/run |",
        "|---" * (1 + 2 * len(HEADERS) + 2) + "|",
    ]
    for name, entry in summary.items():
        ours = [_cell(entry.get(m)) for m in METRICS]
        paper = _paper_cells(PAPER_DEV_SCORES.get(slugs.get(name, ""), {}))
        lines.append(f"| {name} | " + " | ".join(ours) + " | " + " | ".join(paper)
                     + f" | {entry['seeds']} | {entry['wall_s'] / 60:.1f} |")
    lines += ["", COMPARABILITY, "",
              "The report's test numbers (three rows; ours are dev only, the test labels are "
              "not public):", "", "| row | SST test | Quora test | STS test |", "|---|---|---|---|"]
    for row in ROWS:
        if row.slug in PAPER_TEST_SCORES:
            test = PAPER_TEST_SCORES[row.slug]
            lines.append(f"| {row.name} | " + " | ".join(
                f"{test[m]:.3f}" for m in METRICS[:3]) + " |")
    settings = {k: v for k, v in base.to_dict().items()
                if k not in ("smart", "pcgrad", "sts_aug", "mnrl_weight", "aggregator",
                             "weighting", "mode", "seed", "extra")}
    lines += ["", "Settings shared by every row: `" + json.dumps(settings, sort_keys=True) + "`", ""]
    return "\n".join(lines)


def progress_section(finals: dict[str, list[dict[str, Any]]], planned: int,
                     command: str | None) -> str:
    """How many runs the table holds and what they cost, and the command that made them.

    CPU time is each run's wall time times its torch threads (final.json's
    ``wall_s`` and ``threads``; runs saved before ``threads`` was recorded count one).
    """
    done = [f for runs in finals.values() for f in runs]
    thread_s = sum(f["wall_s"] * f.get("threads", 1) for f in done)
    line = (f"Finished runs: {len(done)} of {planned} (rows x seeds); their training and "
            f"evaluation took {thread_s / 3600:.1f} CPU-hours (wall time x threads).")
    precisions = sorted({f["precision"] for f in done if "precision" in f})
    if precisions:
        line += f" Precision: {' and '.join(precisions)}."
    lines = [line, ""]
    if command:
        lines += [f"Made by: `{command}`", ""]
    return "\n".join(lines) + "\n"


def _interval(bounds: tuple[float, float] | None) -> str:
    return "n/a" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def differences_table(differences: dict[str, dict[str, Comparison]],
                      reference: str = "finetune baseline") -> str:
    """Row minus ``reference`` per metric: mean, seed t-interval, example bootstrap."""
    lines = [
        f"## Paired differences against the {reference}", "",
        f"Each cell: mean over shared seeds of (row − {reference}); 95% interval over "
        "seeds (Student t, n−1 df); 95% paired bootstrap over dev examples; verdict "
        "(better/worse only when both intervals exclude 0; n/a: one seed or no saved "
        "predictions).", "",
        "| row | " + " | ".join(HEADERS) + " |", "|---" * (1 + len(HEADERS)) + "|",
    ]
    if not differences:
        lines.append(f"| (no row shares a seed with the {reference}) |" + " |" * len(HEADERS))
    for name, comparisons in differences.items():
        cells = []
        for metric in METRICS:
            c = comparisons.get(metric)
            cells.append("—" if c is None else (
                f"{c.mean:+.3f} seeds {_interval(c.seed_interval)} examples "
                f"{_interval(c.example_interval)} **{c.verdict}** (n={c.seeds})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def conclusions_section(found: list[Any]) -> str:
    lines = ["## What our numbers say", "",
             "The report's four conclusions, each checked against our runs (generated from the "
             "numbers above; a difference counts only when both its intervals exclude 0):", ""]
    for c in found:
        lines.append(f"{c.number}. {c.claim} **{c.status}**: {c.evidence}")
    return "\n".join(lines) + "\n"

