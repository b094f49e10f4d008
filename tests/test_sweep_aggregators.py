"""scripts/sweep_aggregators.py: its planned runs, skipping finished ones, and its table's
numbers on small fake finished runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bert_demo.run_folder.dev_predictions import DEV_PREDICTIONS, dev_predictions_bytes
from bert_demo.run_folder.run_dir import FINAL
from bert_demo.training.weighting import WEIGHTINGS
from gradtools.aggregation import available

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sweep_aggregators.py"
SST_GOLD = [2.0] * 10
PARA_GOLD = [1.0, 0.0] * 5
STS_GOLD = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.5, 2.5, 3.5, 4.5]


@pytest.fixture
def sweep() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sweep_aggregators", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Predictions:
    """What write_dev_predictions reads from an evaluation (TaskPredictions' fields)."""

    def __init__(self, task: str, predicted: list[float], gold: list[float]) -> None:
        self.ids = [f"{task}{i}" for i in range(len(gold))]
        self.predicted, self.gold = predicted, gold


def _finished(folder: Path, sst_right: int, tasks: tuple[str, ...] = ("sst", "para", "sts"),
              para_right: int = 8) -> dict[str, float]:
    """A finished run whose best weights got ``sst_right`` of 10 SST examples right (and
    ``para_right`` of 10 Quora pairs; STS predicted exactly): its dev scores."""
    folder.mkdir(parents=True)
    results: dict[str, Any] = {
        "sst": _Predictions("sst", [2.0] * sst_right + [0.0] * (10 - sst_right), SST_GOLD)}
    dev = {"sst_acc": sst_right / 10}
    if "para" in tasks:
        wrong = [1.0 - g for g in PARA_GOLD]
        results["para"] = _Predictions("para", PARA_GOLD[:para_right] + wrong[para_right:],
                                       PARA_GOLD)
        results["sts"] = _Predictions("sts", STS_GOLD, STS_GOLD)
        dev |= {"para_acc": para_right / 10, "sts_pearson": 1.0}
        dev["overall"] = (dev["sst_acc"] + dev["para_acc"] + (1.0 + 1) / 2) / 3
    else:  # an untrained head's scores, which the table must leave out
        dev |= {"para_acc": 0.5, "sts_pearson": 0.1, "overall": 0.5}
    (folder / DEV_PREDICTIONS).write_bytes(dev_predictions_bytes(results))
    best = {"step": 10, "dev": dev}
    final = {"wall_s": 1.0, "dev": dev, "best": best, "config": {"tasks": list(tasks)}}
    (folder / FINAL).write_text(json.dumps(final))
    (folder / "config.json").write_text(json.dumps({"tasks": list(tasks)}))
    return dev


def _args(out: Path, **extra: Any) -> argparse.Namespace:
    return argparse.Namespace(out=out, seed=0, precision="bf16", threads=1, extra=[], **extra)


def _row(text: str, name: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.split("|")[2:-1]]


def test_planned_runs_keep_the_old_names_and_add_every_weighting(sweep) -> None:
    runs = sweep.planned_runs()
    assert runs["finetune"] == [] and runs["single-sst"] == ["--tasks", "sst"]
    for name in available():
        assert runs[name] == ["--aggregator", name]
    for name in WEIGHTINGS:
        assert runs[f"weight-{name}"] == ["--weighting", name]
    assert len(runs) == 2 + len(available()) + len(WEIGHTINGS)


def test_the_table_from_fake_finished_runs(sweep, tmp_path) -> None:
    _finished(tmp_path / "single-sst", 8, tasks=("sst",))
    _finished(tmp_path / "finetune", 5)
    _finished(tmp_path / "upgrad", 6, para_right=10)
    _finished(tmp_path / "weight-uncertainty", 10)
    text = sweep.write_table(_args(tmp_path)).read_text()
    assert text == (tmp_path / "sweep.md").read_text()

    # single-task SST: its SST score only (its untrained heads' scores are left out).
    assert _row(text, "single-sst") == ["0.800", "—", "—", "—", "—", "—", "—"]
    finetune = _row(text, "finetune")
    assert finetune[:4] == ["0.500", "0.800", "1.000", f"{(0.5 + 0.8 + 1) / 3:.3f}"]
    gap, low, high = _difference(finetune[4])
    assert gap == -0.300 and -1 <= low < gap < high <= 0.0  # 3 of 10 examples differ
    assert finetune[5:] == ["—", "—"]  # the reference itself

    upgrad = _row(text, "upgrad")
    assert upgrad[:4] == ["0.600", "1.000", "1.000", f"{(0.6 + 1.0 + 1) / 3:.3f}"]
    assert _difference(upgrad[4])[0] == -0.200
    assert _difference(upgrad[5])[0] == +0.100
    assert _difference(upgrad[6])[0] == pytest.approx((0.1 + 0.2) / 3, abs=5e-4)

    # Every SST example right where finetune had half right: +0.5, and no resample of the
    # examples can make it worse than finetune; the gap to single-task SST (8 of 10): +0.2.
    weighted = _row(text, "weight-uncertainty")
    assert weighted[0] == "1.000"
    assert _difference(weighted[4])[0] == +0.200
    sst_vs_finetune = _difference(weighted[5])
    assert sst_vs_finetune[0] == +0.500 and sst_vs_finetune[1] > 0  # better on resamples too

    # Planned runs that have not finished are listed as such, the weightings among them.
    assert _row(text, "weight-famo")[0] == "not finished"
    assert _row(text, "mgda")[0] == "not finished"
    assert "Made by: `python scripts/sweep_aggregators.py --out " in text


def _difference(cell: str) -> tuple[float, float, float]:
    """``+0.100 [+0.000, +0.200]`` -> (0.1, 0.0, 0.2)."""
    mean, _, interval = cell.partition(" [")
    low, high = interval.rstrip("]").split(", ")
    return float(mean), float(low), float(high)


def test_finished_runs_are_skipped_and_started_ones_resumed(sweep, tmp_path,
                                                           monkeypatch) -> None:
    _finished(tmp_path / "finetune", 5)
    (tmp_path / "weight-dwa").mkdir()
    (tmp_path / "weight-dwa" / "config.json").write_text("{}")
    commands: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    sweep.run_missing(_args(tmp_path))
    outs = [c[c.index("--out") + 1] for c in commands]
    assert str(tmp_path / "finetune") not in outs
    assert len(commands) == len(sweep.planned_runs()) - 1
    dwa = next(c for c in commands if c[c.index("--out") + 1] == str(tmp_path / "weight-dwa"))
    assert dwa[dwa.index("--weighting") + 1] == "dwa" and dwa[-1] == "--resume"
