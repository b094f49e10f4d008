"""scripts/compare_ablations.py: the same rows of two ablation folders, paired by seed."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from bert_demo.run_folder.run_dir import FINAL

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compare_ablations.py"


def _finished(folder: Path, sst: float) -> None:
    folder.mkdir(parents=True)
    dev = {"sst_acc": sst, "para_acc": 0.8, "sts_pearson": 0.86, "overall": 0.7}
    (folder / FINAL).write_text(json.dumps({"wall_s": 1.0, "best": None, "dev": dev}))


@pytest.fixture
def main():
    return runpy.run_path(str(SCRIPT))["main"]


def test_rows_both_folders_finished_are_compared_seed_by_seed(main, tmp_path, capsys) -> None:
    a, b = tmp_path / "bf16", tmp_path / "fp32"
    for seed, (x, y) in enumerate([(0.45, 0.44), (0.46, 0.44), (0.47, 0.44)]):
        _finished(a / "finetune" / f"seed{seed}", x)
        _finished(b / "finetune" / f"seed{seed}", y)
    _finished(a / "smart" / "seed0", 0.40)  # B has no SMART run: not compared
    assert main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"## Paired differences against the same row in {b}" in out
    row = next(line for line in out.splitlines() if line.startswith("| finetune baseline |"))
    # Differences 0.01, 0.02, 0.03: mean 0.02, t interval 0.02 +- 4.303 * 0.01 / sqrt(3).
    assert "+0.020 seeds [-0.005, +0.045] examples n/a **unclear** (n=3)" in row
    assert "| SMART |" not in out


def test_folders_that_share_no_run_fail(main, tmp_path, capsys) -> None:
    _finished(tmp_path / "a" / "finetune" / "seed0", 0.4)
    _finished(tmp_path / "b" / "finetune" / "seed1", 0.4)
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "share no finished (row, seed)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "missing")])
    assert "missing: no such folder" in capsys.readouterr().err
