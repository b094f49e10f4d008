"""`ablate`: the ten rows, each over seeds; the table, the plot, and skipping finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo.ablate import ROWS, markdown_table, row_config, run_ablation, summarize
from bert_demo.config import TrainConfig
from bert_demo.run_dir import CHECKPOINT, FINAL
from bert_demo.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    root = tmp_path_factory.mktemp("tiny")
    model_dir, data_dir = write_tiny_model(root / "model"), write_tiny_data(root / "data")
    return TrainConfig(model=str(model_dir), data=str(data_dir), batch_sst=3, batch_para=2,
                       batch_sts=2, max_length=16, epochs=1, steps_per_epoch=1, lr=1e-3,
                       eval_batch_size=4, pooling="mean")


def test_the_ten_rows_of_the_paper() -> None:
    assert len(ROWS) == 10
    base = TrainConfig(smart=True)  # a base with a method on must not leak into every row
    configs = {row.slug: row_config(base, row, seed=3) for row in ROWS}
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


def test_mean_and_std_over_seeds() -> None:
    finals = [{"wall_s": 60.0, "dev": {"sst_acc": a, "para_acc": 0.5, "sts_pearson": 0.2,
                                        "overall": 0.4}} for a in (0.4, 0.5, 0.6)]
    summary = summarize({"finetune baseline": finals})
    assert summary["finetune baseline"]["sst_acc"]["mean"] == pytest.approx(0.5)
    assert summary["finetune baseline"]["sst_acc"]["std"] == pytest.approx(0.1)  # sample std
    table = markdown_table(summary, TrainConfig(), seeds=3)
    assert "| finetune baseline | 0.500 ± 0.100 | 0.500 ± 0.000 | 0.200 ± 0.000 |" in table


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
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "ablation.json").read_text())
    assert summary["pretrained baseline (frozen encoder)"]["seeds"] == 2

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
