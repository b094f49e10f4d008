"""`ablate`: the ten rows, each over seeds; the table, the plot, and skipping finished runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ablation_helpers
import pytest
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo.ablation.ablate import (
    EXTRA_ROWS,
    PAPER_DEV_SCORES,
    PAPER_ROWS,
    ROWS,
    AblationFailed,
    dev_scores,
    markdown_table,
    paper_overall,
    row_config,
    run_ablation,
    summarize,
)
from bert_demo.config import TrainConfig
from bert_demo.run_folder.dev_predictions import DEV_PREDICTIONS
from bert_demo.run_folder.run_dir import CHECKPOINT, FINAL
from bert_demo.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    root = tmp_path_factory.mktemp("tiny")
    model_dir, data_dir = write_tiny_model(root / "model"), write_tiny_data(root / "data")
    return TrainConfig(model=str(model_dir), data=str(data_dir), batch_sst=3, batch_para=2,
                       batch_sts=2, max_length=16, epochs=1, steps_per_epoch=1, lr=1e-3,
                       eval_batch_size=4, pooling="mean")


def test_the_ten_rows_of_the_paper() -> None:
    assert len(PAPER_ROWS) == 10 and ROWS[:10] == PAPER_ROWS
    base = TrainConfig(smart=True)  # a base with a method on must not leak into every row
    configs = {row.slug: row_config(base, row, seed=3) for row in PAPER_ROWS}
    methods = {slug: (c.smart, c.pcgrad, c.sts_aug, c.mode, c.tasks) for slug, c in configs.items()}
    three = ("sst", "para", "sts")
    assert methods == {
        "single-sst": (False, False, False, "finetune", ("sst",)),
        "frozen": (False, False, False, "frozen", three),
        "finetune": (False, False, False, "finetune", three),
        "smart": (True, False, False, "finetune", three),
        "pcgrad": (False, True, False, "finetune", three),
        "stsaug": (False, False, True, "finetune", three),
        "smart-pcgrad": (True, True, False, "finetune", three),
        "smart-stsaug": (True, False, True, "finetune", three),
        "pcgrad-stsaug": (False, True, True, "finetune", three),
        "all": (True, True, True, "finetune", three),
    }
    assert all(c.seed == 3 for c in configs.values())
    assert all(c.mnrl_weight == 0 and c.aggregator in (None, "pcgrad")
               for c in configs.values())


def test_the_rows_beyond_the_paper() -> None:
    base = TrainConfig(aggregator="pcgrad", mnrl_weight=1.0)  # nothing leaks from the base
    mnrl, aggregator = (row_config(base, row, seed=0) for row in EXTRA_ROWS)
    assert (mnrl.smart, mnrl.pcgrad, mnrl.sts_aug, mnrl.aggregator) == (True, True, True,
                                                                        "pcgrad")
    assert mnrl.mnrl_weight > 0
    assert (aggregator.smart, aggregator.pcgrad, aggregator.sts_aug) == (True, False, True)
    assert aggregator.aggregator == "upgrad" and aggregator.mnrl_weight == 0
    assert row_config(base, ROWS[2], seed=0).mnrl_weight == 0  # finetune baseline


def test_paper_column_is_the_reports_dev_numbers() -> None:
    assert set(PAPER_DEV_SCORES) == {row.slug for row in PAPER_ROWS}
    assert PAPER_DEV_SCORES["all"] == {"sst_acc": 0.525, "para_acc": 0.752, "sts_pearson": 0.375}
    assert PAPER_DEV_SCORES["single-sst"] == {"sst_acc": 0.515}
    assert paper_overall(PAPER_DEV_SCORES["finetune"]) == pytest.approx(
        (0.511 + 0.750 + 1.345 / 2) / 3)
    assert paper_overall(PAPER_DEV_SCORES["single-sst"]) is None


def test_mean_and_std_over_seeds() -> None:
    finals = [{"wall_s": 60.0, "dev": {"sst_acc": a, "para_acc": 0.5, "sts_pearson": 0.2,
                                        "overall": 0.4}} for a in (0.4, 0.5, 0.6)]
    summary = summarize({"finetune baseline": finals})
    assert summary["finetune baseline"]["sst_acc"]["mean"] == pytest.approx(0.5)
    assert summary["finetune baseline"]["sst_acc"]["std"] == pytest.approx(0.1)  # sample std
    table = markdown_table(summary, TrainConfig(), seeds=3)
    assert ("| finetune baseline | 0.500 ± 0.100 | 0.500 ± 0.000 | 0.200 ± 0.000 | "
            "0.400 ± 0.000 | 0.511 | 0.750 | 0.345 | 0.644* | 3 | 1.0 |") in table
    assert "| SMART + PCGrad | 0.525 | 0.762 | 0.336 |" in table  # the report's test numbers
    # A row part-way through its seeds says how many it has (the ablation spans sittings).
    partial = markdown_table(summarize({"finetune baseline": finals[:2]}), TrainConfig(), seeds=3)
    assert "| 0.644* | 2 | 1.0 |" in partial and "(of 3 planned;" in partial


def test_the_table_reports_each_runs_best_weights() -> None:
    """As the paper: the best evaluation's scores (final.json's best), not the last one's."""
    last = {"sst_acc": 0.2, "para_acc": 0.5, "sts_pearson": 0.1, "overall": 0.4}
    best = {"sst_acc": 0.6, "para_acc": 0.7, "sts_pearson": 0.3, "overall": 0.6}
    finals = [{"wall_s": 60.0, "dev": last, "best": {"step": 2, "dev": best}},
              # No best weights (every evaluation NaN, or an older run): the last evaluation.
              {"wall_s": 60.0, "dev": {**last, "sst_acc": 0.4}, "best": None}]
    summary = summarize({"finetune baseline": finals})["finetune baseline"]
    assert summary["sst_acc"]["mean"] == pytest.approx((0.6 + 0.4) / 2)
    assert summary["para_acc"]["mean"] == pytest.approx((0.7 + 0.5) / 2)


def test_tasks_a_row_did_not_train_are_left_out() -> None:
    # The single-task SST row is also evaluated on Quora and STS with untrained heads;
    # those scores and the overall that averages them in are not the row's.
    dev = {"sst_acc": 0.49, "para_acc": 0.46, "sts_pearson": 0.70, "overall": 0.60}
    single = {"wall_s": 60.0, "dev": dev, "best": {"step": 1, "dev": dev},
              "config": {"tasks": ["sst"]}}
    three = {**single, "config": {"tasks": ["sst", "para", "sts"]}}
    assert dev_scores(single) == {"sst_acc": 0.49}
    assert dev_scores(three) == dev
    summary = summarize({"single-task SST baseline": [single]})
    table = markdown_table(summary, TrainConfig(), seeds=1)
    assert "| single-task SST baseline | 0.490 | — | — | — | 0.515 | — | — | — | 1 |" in table


@pytest.mark.slow
def test_ablation_runs_rows_and_skips_finished_ones(base, tmp_path) -> None:
    rows = ["single-sst", "frozen", "all"]
    table = run_ablation(base, tmp_path, seeds=2, rows=rows, progress=False, train=train)
    text = table.read_text()
    for slug in rows:
        for seed in (0, 1):
            final = json.loads((tmp_path / slug / f"seed{seed}" / FINAL).read_text())
            assert final["config"]["seed"] == seed
    assert "| single-task SST baseline |" in text and "| SMART + PCGrad + stsAug |" in text
    assert text.count(" ± ") >= 3 * 4
    assert (tmp_path / "differences.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "ablation.json").read_text())
    rows_json = summary["rows"]
    assert rows_json["pretrained baseline (frozen encoder)"]["seeds"] == 2
    assert (tmp_path / "all" / "seed0" / DEV_PREDICTIONS).is_file()
    assert "## Paired differences against the finetune baseline" in text
    assert "## What our numbers say" in text and len(summary["conclusions"]) == 4
    # Without the finetune row nothing can be compared, and no conclusion is drawn.
    assert {c["status"] for c in summary["conclusions"]} == {"inconclusive"}

    # A rerun trains nothing when every run has finished ...
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    assert run_ablation(base, tmp_path, seeds=2, rows=rows, progress=False,
                        train=no_training).read_text() == text

    # ... and resumes a run that has a checkpoint but no final.json.
    # (A finished run deletes its checkpoint: put one back as an interrupted run has.)
    (tmp_path / "all" / "seed1" / FINAL).unlink()
    (tmp_path / "all" / "seed1" / CHECKPOINT).write_bytes(b"")
    calls: list[tuple[Path, bool]] = []

    def record(config, out, resume=False, **kwargs):
        calls.append((Path(out), resume))
        (Path(out) / FINAL).write_text(json.dumps(json.loads(
            (tmp_path / "all" / "seed0" / FINAL).read_text())))
        return {}

    run_ablation(base, tmp_path, seeds=2, rows=rows, progress=False, train=record)
    assert calls == [(tmp_path / "all" / "seed1", True)]


def test_a_failed_run_fails_the_ablation_after_the_others(base, tmp_path) -> None:
    trained: list[str] = []

    def flaky(config, out, **kwargs):
        if config.seed == 0 and config.smart:
            raise RuntimeError("out of memory")
        trained.append(f"{Path(out).parent.name}/{Path(out).name}")
        return train(config, out, **kwargs)

    with pytest.raises(AblationFailed, match=r"smart/seed0 \(RuntimeError: out of memory\)"):
        run_ablation(base, tmp_path, seeds=1, rows=["smart", "finetune"], progress=False,
                     train=flaky)
    assert trained == ["finetune/seed0"]  # the run after the failed one still trained
    assert "| finetune baseline |" in (tmp_path / "ablation.md").read_text()


@pytest.mark.slow
def test_parallel_jobs_train_split_threads_and_report_failures(base, tmp_path) -> None:
    # Two jobs at once on two threads: one thread each, in spawned processes.
    table = run_ablation(base, tmp_path, seeds=1, rows=["finetune", "pcgrad"], progress=False,
                         train=ablation_helpers.train_recording_threads, jobs=2, threads=2)
    for slug in ("finetune", "pcgrad"):
        final = json.loads((tmp_path / slug / "seed0" / FINAL).read_text())
        assert final["threads"] == 1
        assert (tmp_path / slug / "seed0" / "threads.txt").read_text() == "1"
    assert "| PCGrad |" in table.read_text()
    pids = {(tmp_path / s / "seed0" / "pid.txt").read_text() for s in ("finetune", "pcgrad")}
    assert len(pids) == 2  # two processes

    # A failing run in a worker: the other still finishes, the error names the run.
    with pytest.raises(AblationFailed, match=r"stsaug/seed0 \(RuntimeError: seed 0 of stsaug"):
        run_ablation(base, tmp_path, seeds=1, rows=["finetune", "pcgrad", "stsaug", "smart"],
                     progress=False, train=ablation_helpers.train_failing_stsaug, jobs=2,
                     threads=2)
    assert (tmp_path / "smart" / "seed0" / FINAL).is_file()
    assert not (tmp_path / "stsaug" / "seed0" / FINAL).is_file()


def test_runs_go_seed_major_and_the_table_says_how_far_and_by_what_command(base,
                                                                           tmp_path) -> None:
    # Seed-major: an ablation stopped part-way (it spans sittings) has every row at the
    # first seed before any row gets a second one.
    order: list[str] = []

    def fake(config, out, **kwargs):
        order.append(f"{Path(out).parent.name}/{Path(out).name}")
        final = {"wall_s": 90.0 if config.seed == 0 else 30.0, "threads": 2,
                 "dev": {"sst_acc": 0.5, "para_acc": 0.7, "sts_pearson": 0.8, "overall": 0.7},
                 "best": None}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / FINAL).write_text(json.dumps(final))
        return final

    rows = ["finetune", "smart", "pcgrad"]
    run_ablation(base, tmp_path, seeds=2, rows=rows, progress=False, train=fake,
                 command="python -m bert_demo ablate --seeds 2")
    assert order == ["finetune/seed0", "smart/seed0", "pcgrad/seed0",
                     "finetune/seed1", "smart/seed1", "pcgrad/seed1"]
    text = (tmp_path / "ablation.md").read_text()
    # 3 runs x 90 s x 2 threads + 3 x 30 s x 2 = 720 thread-seconds = 0.2 CPU-hours.
    assert "Finished runs: 6 of 6 (rows x seeds); their training and evaluation took " \
           "0.2 CPU-hours" in text
    assert "Made by: `python -m bert_demo ablate --seeds 2`" in text
    # A run that failed is not counted: the table says 5 of 6 and still names the command.
    (tmp_path / "smart" / "seed1" / FINAL).unlink()

    def failing(*args, **kwargs):
        raise RuntimeError("no")

    with pytest.raises(AblationFailed):
        run_ablation(base, tmp_path, seeds=2, rows=rows, progress=False, train=failing,
                     command="python -m bert_demo ablate --seeds 2")
    text = (tmp_path / "ablation.md").read_text()
    assert "Finished runs: 5 of 6" in text and "Made by: `python -m bert_demo ablate" in text


def _finished(folder: Path, precision: str) -> dict:
    final = {"wall_s": 60.0, "threads": 1, "precision": precision, "best": None,
             "dev": {"sst_acc": 0.5, "para_acc": 0.7, "sts_pearson": 0.8, "overall": 0.7}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FINAL).write_text(json.dumps(final))
    return final


def test_an_ablation_is_not_continued_in_another_precision(base, tmp_path, monkeypatch) -> None:
    # Found by resuming an fp32 ablation on a CPU with bf16 units: --precision auto
    # trained the last run in bf16 and the table mixed the two without a word.
    _finished(tmp_path / "finetune" / "seed0", "fp32")

    def no_training(*args, **kwargs):
        raise AssertionError("a run of the other precision was trained")

    rows = ["finetune", "smart"]
    with pytest.raises(ValueError, match=r"--out .*trained in fp32, but --precision bf16 "
                                         r"trains new runs in bf16 here; pass --precision fp32"):
        run_ablation(dataclasses.replace(base, precision="bf16"), tmp_path, seeds=1,
                     rows=rows, progress=False, train=no_training)
    # auto is what hides it: on a machine with bf16 units it means bf16.
    monkeypatch.setattr("bert_demo.training.speed.bf16_is_native",
                        lambda device, flags=None: (True, "bf16 units"))
    with pytest.raises(ValueError, match=r"--precision auto trains new runs in bf16"):
        run_ablation(dataclasses.replace(base, precision="auto"), tmp_path, seeds=1,
                     rows=rows, progress=False, train=no_training)
    assert not (tmp_path / "smart" / "seed0").exists()

    # The runs' own precision continues it, and the table names it.
    trained: list[str] = []

    def fake(config, out, **kwargs):
        trained.append(Path(out).parent.name)
        return _finished(Path(out), config.precision)

    run_ablation(dataclasses.replace(base, precision="fp32"), tmp_path, seeds=1, rows=rows,
                 progress=False, train=fake)
    assert trained == ["smart"]
    assert "CPU-hours (wall time x threads). Precision: fp32." in (
        tmp_path / "ablation.md").read_text()
    # --table-only trains nothing, so it may summarize a folder of any precision.
    _finished(tmp_path / "pcgrad" / "seed0", "bf16")
    table = run_ablation(base, tmp_path, seeds=1, rows=[*rows, "pcgrad"], progress=False,
                         train=no_training, table_only=True)
    assert "Precision: bf16 and fp32." in table.read_text()


def test_table_only_trains_nothing_and_records_the_training_command(base, tmp_path,
                                                                    monkeypatch) -> None:
    from bert_demo import cli

    folder = tmp_path / "finetune" / "seed0"
    folder.mkdir(parents=True)
    (folder / FINAL).write_text(json.dumps(
        {"wall_s": 600.0, "threads": 1, "best": None,
         "dev": {"sst_acc": 0.5, "para_acc": 0.7, "sts_pearson": 0.8, "overall": 0.7}}))

    def no_training(*args, **kwargs):
        raise AssertionError("--table-only trained a run")

    monkeypatch.setattr("bert_demo.training.train.train", no_training)
    argv = ["ablate", "--seeds", "3", "--jobs", "2", "--table-only", "--out", str(tmp_path),
            "--model", base.model, "--data", base.data]
    assert cli.main(argv) == 0
    text = (tmp_path / "ablation.md").read_text()
    assert "| finetune baseline | 0.500 |" in text
    assert "Finished runs: 1 of 36 (rows x seeds)" in text
    assert (f"Made by: `python -m bert_demo ablate --seeds 3 --jobs 2 --out {tmp_path} "
            f"--model {base.model} --data {base.data}`") in text
    assert not (tmp_path / "smart").exists()
