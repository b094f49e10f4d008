"""Dev metrics against hand-computed values; prediction files; the analysis report."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo.config import TrainConfig
from bert_demo.evaluation.analyze import analyze, confusion_matrix, largest_errors
from bert_demo.evaluation.evaluate import (
    TaskPredictions,
    accuracy,
    overall_score,
    pearson,
    write_predictions,
)
from bert_demo.evaluation.predict import predict_files
from bert_demo.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_accuracy_by_hand() -> None:
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    assert accuracy([0.0, 1.0, 1.0], [0.0, 1.0, 1.0]) == 1.0
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([1, 2, 3], [1, 2])


def test_pearson_by_hand() -> None:
    # x - mean = [-1.5, -.5, .5, 1.5], y - mean = [-1.5, .5, -.5, 1.5]:
    # sum of products 4, both sums of squares 5 -> r = 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0, abs=1e-12)
    # Invariant to affine maps of the prediction: why an untrained cosine already scores.
    assert pearson([0.1, 0.4, 0.2, 0.9], [1, 3, 2, 4]) == pytest.approx(
        pearson([5 * v + 1 for v in (0.1, 0.4, 0.2, 0.9)], [1, 3, 2, 4]), abs=1e-12
    )
    assert math.isnan(pearson([2, 2, 2], [1, 2, 3]))
    with pytest.raises(ValueError, match="at least two"):
        pearson([1], [1])


def test_overall_score_by_hand() -> None:
    # mean(0.5, 0.8, (0.6 + 1) / 2 = 0.8) = 0.7
    assert overall_score(0.5, 0.8, 0.6) == pytest.approx(0.7, abs=1e-12)
    assert overall_score(1.0, 1.0, 1.0) == pytest.approx(1.0)
    assert overall_score(0.0, 0.0, -1.0) == pytest.approx(0.0)


def test_confusion_matrix_and_largest_errors() -> None:
    counts = confusion_matrix([0, 1, 1, 4], [0, 1, 2, 4], 5)
    assert counts[2, 1] == 1 and counts.trace() == 3 and counts.sum() == 4
    outputs = torch.tensor([[5.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 0, 0, 9.0]])
    sst = TaskPredictions("sst", ["a", "b", "c"], outputs, [0.0, 1.0, 4.0], [1.0, 1.0, 0.0])
    # Two errors; the more confident one (row 2, logit 9) first.
    assert [row for row, _ in largest_errors(sst, 5)] == [2, 0]
    sts = TaskPredictions("sts", ["a", "b", "c"], torch.tensor([1.0, 4.0, 2.0]),
                          [1.0, 4.0, 2.0], [1.0, 1.0, 2.5])
    assert largest_errors(sts, 2) == [(1, 3.0), (2, 0.5)]
    # Quora: only wrong labels are errors, however far a right one is from certainty.
    para = TaskPredictions("para", ["a", "b", "c"], torch.tensor([0.1, -3.0, 2.0]),
                           [1.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    assert [row for row, _ in largest_errors(para, 5)] == [1, 0]


def test_prediction_file_has_ids_in_input_order(tmp_path) -> None:
    result = TaskPredictions("sts", ["x9", "x1", "x5"], torch.tensor([0.5, 5.5, 2.0]),
                             [0.5, 5.0, 2.0], None)
    path = write_predictions(tmp_path / "out" / "sts.csv", result)
    rows = list(csv.reader(path.open()))
    # The label, then the model's unclipped score (here 5.5 is clipped to 5).
    assert rows == [["id", "predicted_similarity", "raw_similarity"], ["x9", "0.5000", "0.5"],
                    ["x1", "5.0000", "5.5"], ["x5", "2.0000", "2"]]
    assert not list(path.parent.glob("*.tmp"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("run")
    model_dir, data_dir = write_tiny_model(root / "model"), write_tiny_data(root / "data")
    config = TrainConfig(model=str(model_dir), data=str(data_dir), batch_sst=3, batch_para=2,
                         batch_sts=2, max_length=16, epochs=1, steps_per_epoch=1, lr=1e-3,
                         eval_batch_size=4, pooling="mean")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train(config, root / "run", progress=False)
    torch.set_num_threads(threads)
    return root / "run", data_dir


def _read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open()))


def _ids(path: Path) -> list[str]:
    lines = path.read_text().splitlines()[1:]
    return [line.split("\t")[2 if "test-student" in path.name and "sst" in path.name else 1]
            for line in lines]


def test_predict_writes_every_dev_and_test_file(trained_run) -> None:
    run, data_dir = trained_run
    written = dict(predict_files(run))
    names = sorted(p.name for p in written)
    assert names == sorted([
        "ids-sst-dev-predictions.csv", "ids-sst-test-student-predictions.csv",
        "quora-dev-predictions.csv", "sts-dev-predictions.csv",
        "sts-test-student-predictions.csv",
    ])
    for path, count in written.items():
        source = data_dir / path.name.replace("-predictions", "")
        rows = _read_csv(path)
        assert count == len(rows) - 1 == len(_ids(source))
        assert [r[0] for r in rows[1:]] == _ids(source)
        values = [float(r[1]) for r in rows[1:]]
        if path.name.startswith("ids-sst"):
            assert rows[0] == ["id", "predicted_sentiment", *(f"prob_{i}" for i in range(5))]
            assert all(v in {0, 1, 2, 3, 4} for v in values)
            for r in rows[1:]:
                probs = [float(x) for x in r[2:]]
                assert sum(probs) == pytest.approx(1.0, abs=1e-4)
                assert max(range(5), key=lambda i: probs[i]) == int(r[1])  # label = argmax
        elif path.name.startswith("quora"):
            assert rows[0] == ["id", "predicted_is_duplicate", "prob_is_duplicate"]
            assert all(v in {0, 1} for v in values)
            assert all((float(r[2]) > 0.5) == (r[1] == "1") for r in rows[1:])
        else:
            assert all(0.0 <= v <= 5.0 for v in values)


def test_predict_one_file_to_a_named_csv(trained_run, tmp_path) -> None:
    run, data_dir = trained_run
    target = tmp_path / "mine.csv"
    [(path, count)] = predict_files(run, [str(data_dir / "sts-test-student.csv")], output=target)
    assert path == target and count == 3
    with pytest.raises(ValueError, match="cannot tell the task"):
        predict_files(run, [str(data_dir / "mystery.csv")])
    with pytest.raises(FileNotFoundError, match=r"nothing\.csv"):
        predict_files(run, [str(data_dir / "nothing.csv")], task="sst")


def test_analyze_writes_confusion_png_and_error_report(trained_run, tmp_path) -> None:
    run, _ = trained_run
    report = analyze(run, tmp_path / "analysis", top=3)
    png = tmp_path / "analysis" / "sst_confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    for task in ("sst", "para", "sts"):
        assert f"## {task}" in text
    # The confusion table has one row per gold class, and at most 3 errors per task.
    lines = text.splitlines()
    assert sum(line.startswith("| very negative |") for line in lines) == 1
    # Error tables: header, rule, then at most `top` rows with ids from each dev file.
    assert 1 <= sum(re.match(r"\| q\d ", line) is not None for line in lines) <= 3
    assert 1 <= sum(re.match(r"\| p\d ", line) is not None for line in lines) <= 3
    assert " // " in text  # pairs show both sentences
