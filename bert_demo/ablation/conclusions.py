"""The report's four conclusions, each marked confirmed / refuted / inconclusive by our runs.

Each check compares rows with :func:`bert_demo.ablation.stats.compare` and takes a
difference as real only when its seed interval and its dev-example bootstrap
interval both exclude zero (:attr:`Comparison.verdict`). A conclusion is
*confirmed* when the differences it claims are real, *refuted* when real
differences point the other way, and *inconclusive* otherwise, including when a
needed row was not run or has one seed. The wording of each verdict lists the
numbers it rests on, so the text claims nothing the numbers do not show.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

from bert_demo.ablation.stats import BOOTSTRAP_REPLICATES, Comparison, Run
from bert_demo.ablation.stats import compare as _compare

Status = Literal["confirmed", "refuted", "inconclusive"]
Compare = Callable[[Sequence[Run], Sequence[Run]], dict[str, Comparison]]
TASK_METRICS = ("sst_acc", "para_acc", "sts_pearson")

# Row slugs (see bert_demo.ablation.ablate.ROWS) the conclusions read.
BASELINE = "finetune"
SINGLES = ("smart", "pcgrad", "stsaug")
COMBINATIONS = {"smart-pcgrad": ("smart", "pcgrad"), "smart-stsaug": ("smart", "stsaug"),
                "pcgrad-stsaug": ("pcgrad", "stsaug"), "all": ("smart", "pcgrad", "stsaug")}
MULTITASK_ROWS = ("finetune", *SINGLES, *COMBINATIONS)
STSAUG_PAIRS = (("finetune", "stsaug"), ("smart", "smart-stsaug"),
                ("pcgrad", "pcgrad-stsaug"), ("smart-pcgrad", "all"))


@dataclass(frozen=True)
class Conclusion:
    number: int
    claim: str
    status: Status
    evidence: str


def _describe(c: Comparison) -> str:
    def interval(i: tuple[float, float] | None) -> str:
        return "n/a" if i is None else f"[{i[0]:+.3f}, {i[1]:+.3f}]"

    return (f"{c.mean:+.3f} (seeds {interval(c.seed_interval)}, "
            f"examples {interval(c.example_interval)}, n={c.seeds})")


def _missing(runs: Mapping[str, Sequence[Run]], slugs: Sequence[str]) -> list[str]:
    return [s for s in slugs if not runs.get(s)]


def _uses_smart(slug: str) -> bool:
    return slug == "smart" or "smart" in COMBINATIONS.get(slug, ())


def best_rows_use_smart(runs: Mapping[str, Sequence[Run]], compare: Compare = _compare) -> Conclusion:
    claim = ("The best dev rows all use SMART (SMART+PCGrad+stsAug best on SST and STS, "
             "SMART+stsAug best on Quora).")
    missing = _missing(runs, MULTITASK_ROWS)
    if missing:
        return Conclusion(1, claim, "inconclusive", f"rows not run: {', '.join(missing)}")
    statuses: list[Status] = []
    parts = []
    for metric in TASK_METRICS:
        def mean(slug: str, metric: str = metric) -> float:
            return statistics.fmean(r.dev[metric] for r in runs[slug])

        with_smart = max((s for s in MULTITASK_ROWS if _uses_smart(s)), key=mean)
        without = max((s for s in MULTITASK_ROWS if not _uses_smart(s)), key=mean)
        c = compare(runs[with_smart], runs[without])[metric]
        statuses.append("confirmed" if c.verdict == "better" else
                        "refuted" if c.verdict == "worse" else "inconclusive")
        parts.append(f"{metric}: best SMART row {with_smart} minus best other row {without} "
                     f"{_describe(c)}")
    status: Status = ("refuted" if "refuted" in statuses else
                      "confirmed" if all(s == "confirmed" for s in statuses) else "inconclusive")
    return Conclusion(1, claim, status, "; ".join(parts))


def combinations_beat_singles(runs: Mapping[str, Sequence[Run]], compare: Compare = _compare) -> Conclusion:
    claim = "Combinations generally beat the baseline and single methods."
    missing = _missing(runs, MULTITASK_ROWS)
    if missing:
        return Conclusion(2, claim, "inconclusive", f"rows not run: {', '.join(missing)}")
    beats, loses, parts = 0, 0, []
    for combo, members in COMBINATIONS.items():
        references = [BASELINE, *members]
        verdicts = []
        for reference in references:
            c = compare(runs[combo], runs[reference])["overall"]
            verdicts.append(c.verdict)
            parts.append(f"{combo} - {reference} overall {_describe(c)}")
        beats += all(v == "better" for v in verdicts)
        loses += any(v == "worse" for v in verdicts)
    # "Generally": most of the four combinations (3 or more).
    status: Status = ("confirmed" if beats >= 3 else "refuted" if loses >= 3 else "inconclusive")
    summary = (f"{beats} of 4 combinations beat the baseline and each of their single methods "
               f"on overall; {loses} of 4 lose to at least one of them")
    return Conclusion(2, claim, status, summary + ". " + "; ".join(parts))


def stsaug_not_consistent(runs: Mapping[str, Sequence[Run]], compare: Compare = _compare) -> Conclusion:
    claim = "stsAug did not consistently help STS (SMART 0.371 vs SMART+stsAug 0.343)."
    slugs = sorted({s for pair in STSAUG_PAIRS for s in pair})
    missing = _missing(runs, slugs)
    if missing:
        return Conclusion(3, claim, "inconclusive", f"rows not run: {', '.join(missing)}")
    verdicts, parts = [], []
    for without, with_aug in STSAUG_PAIRS:
        c = compare(runs[with_aug], runs[without])["sts_pearson"]
        verdicts.append(c.verdict)
        parts.append(f"{with_aug} - {without} STS r {_describe(c)}")
    # Refuted only if stsAug helps in every pairing; confirmed if it really hurts in one.
    status: Status = ("refuted" if all(v == "better" for v in verdicts) else
                      "confirmed" if "worse" in verdicts else "inconclusive")
    return Conclusion(3, claim, status, "; ".join(parts))


def smart_pcgrad_beats_all(runs: Mapping[str, Sequence[Run]], compare: Compare = _compare) -> Conclusion:
    claim = ("On test, SMART+PCGrad beat SMART+PCGrad+stsAug on all three tasks "
             "(checked here on dev: the test labels are not public).")
    missing = _missing(runs, ("smart-pcgrad", "all"))
    if missing:
        return Conclusion(4, claim, "inconclusive", f"rows not run: {', '.join(missing)}")
    comparisons = compare(runs["smart-pcgrad"], runs["all"])
    verdicts = [comparisons[m].verdict for m in TASK_METRICS]
    status: Status = ("confirmed" if all(v == "better" for v in verdicts) else
                      "refuted" if "worse" in verdicts else "inconclusive")
    parts = [f"smart-pcgrad - all {m} {_describe(comparisons[m])}" for m in TASK_METRICS]
    return Conclusion(4, claim, status, "; ".join(parts))


def conclusions(runs: Mapping[str, Sequence[Run]],
                replicates: int = BOOTSTRAP_REPLICATES) -> list[Conclusion]:
    """The four conclusions, in the report's order, for runs keyed by row slug."""
    compare = partial(_compare, replicates=replicates)
    return [best_rows_use_smart(runs, compare), combinations_beat_singles(runs, compare),
            stsaug_not_consistent(runs, compare), smart_pcgrad_beats_all(runs, compare)]
