"""bert_demo --weighting (issue 22 item 6): every gradtools.weighting method trains a tiny
run, logs its weights, resumes exactly, and the combinations that cannot work are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from demo_fixtures import write_tiny_data, write_tiny_model

import gradtools.weighting as wt
from bert_demo.cli import build_parser, main
from bert_demo.config import TrainConfig
from bert_demo.run_folder.run_dir import CHECKPOINT, METRICS
from bert_demo.training.train import Trainer
from bert_demo.training.weighting import (
    OWN_STEP,
    SCALE_FREE_AGGREGATORS,
    WEIGHTINGS,
    weighting_refusal,
)
from gradtools.aggregation import available, from_name

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def tiny_config(tiny: tuple[Path, Path], **overrides: Any) -> TrainConfig:
    model_dir, data_dir = tiny
    # One step per epoch, so that DWA has two finished epochs by step 3.
    settings: dict[str, Any] = {
        "model": str(model_dir), "data": str(data_dir), "batch_sst": 3, "batch_para": 2,
        "batch_sts": 2, "max_length": 16, "epochs": 4, "steps_per_epoch": 1, "lr": 1e-3,
        "eval_batch_size": 4, "log_every": 1, "length_buckets": 2, "pooling": "mean",
        "max_eval_examples": 2,
    }
    return TrainConfig(**{**settings, **overrides})


def tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A weighting's state dict as flat tensors (RLW keeps its generator in an extra state)."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in tensors(value).items()})
        elif isinstance(value, torch.Tensor):
            flat[key] = value.clone()
    return flat


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN where NaN (FAMO marks its consumed losses with NaN)."""
    return a.shape == b.shape and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def records(run: Path) -> list[dict[str, Any]]:
    lines = (run / METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "train"]


def test_the_choices_are_every_gradtools_weighting() -> None:
    exported = {getattr(wt, n) for n in wt.__all__} - {wt.LossWeighting}
    assert {cls for cls, _ in WEIGHTINGS.values()} == exported
    spec = next(a for a in build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
                .choices["train"]._actions if a.dest == "weighting")
    assert tuple(spec.choices) == tuple(WEIGHTINGS)


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_each_weighting_trains_logs_its_weights_and_saves_its_state(tiny, tmp_path, name) -> None:
    trainer = Trainer(tiny_config(tiny, weighting=name), tmp_path / "run", progress=False,
                      keep_checkpoint=True)
    assert trainer.weighting is not None
    learnable = list(trainer.weighting.parameters())
    before = tensors(trainer.weighting.state_dict())
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in learnable)
    trainer.run()

    logged = records(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    tasks = trainer.config.tasks
    for record in logged:
        weights = [record[f"weight_{t}"] for t in tasks]
        assert all(w > 0 and torch.isfinite(torch.tensor(w)) for w in weights)
    last = trainer.weighting.weights.tolist()
    assert [logged[-1][f"weight_{t}"] for t in tasks] == pytest.approx(last, rel=1e-6)
    # Each method's weights moved away from where they started (DWA's after two epochs).
    assert [logged[-1][f"weight_{t}"] for t in tasks] != [logged[0][f"weight_{t}"] for t in tasks]
    after = tensors(trainer.weighting.state_dict())
    assert any(not same(before[k], after[k]) for k in before if k != "last_weights")
    # The checkpoint holds the weighting's state as it ended.
    saved = tensors(torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["weighting"])
    assert saved.keys() == after.keys()
    assert all(same(saved[k], after[k]) for k in after)


def _interrupt_at(step: int):
    def hook(current: int) -> None:
        if current == step:
            raise KeyboardInterrupt

    return hook


@pytest.mark.parametrize("overrides", [
    {"weighting": "uncertainty"}, {"weighting": "dwa"}, {"weighting": "rlw"},
    {"weighting": "famo"}, {"weighting": "uncertainty", "aggregator": "upgrad"},
], ids=lambda o: "-".join(o.values()))
def test_resume_continues_bit_identically(tiny, tmp_path, overrides) -> None:
    config = tiny_config(tiny, **overrides)
    straight = Trainer(config, tmp_path / "straight", progress=False)
    straight.run()
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "resumed", progress=False, on_step=_interrupt_at(2)).run()
    resumed = Trainer(config, tmp_path / "resumed", resume=True, progress=False)
    resumed.run()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.weighting is not None and resumed.weighting is not None
    wa, wb = tensors(straight.weighting.state_dict()), tensors(resumed.weighting.state_dict())
    assert wa.keys() == wb.keys() and all(same(wa[k], wb[k]) for k in wa)
    strip = ("elapsed_s",)
    logged = [[{k: v for k, v in r.items() if k not in strip} for r in records(run)]
              for run in (tmp_path / "straight", tmp_path / "resumed")]
    assert logged[0] == logged[1]


def test_with_the_sum_aggregator_it_is_the_weighted_loss(tiny, tmp_path) -> None:
    """The aggregator path hands the weighted task losses to the aggregator and trains the
    weighting's parameters apart: with Sum, that is the summed weighted loss's gradient."""
    trainers = {}
    for name, aggregator in (("plain", None), ("sum", "sum")):
        trainer = Trainer(tiny_config(tiny, weighting="uncertainty", aggregator=aggregator),
                          tmp_path / name, progress=False)
        stats = trainer.training_step()
        trainer.folder.release()
        trainers[name] = (trainer, stats)
    (plain, _), (summed, stats) = trainers["plain"], trainers["sum"]
    grads = [dict(t.model.named_parameters()) for t in (plain, summed)]
    assert any(p.grad is not None for p in grads[0].values())
    for key, p in grads[0].items():
        if p.grad is None:
            assert grads[1][key].grad is None, key
        else:
            torch.testing.assert_close(p.grad, grads[1][key].grad, rtol=1e-5, atol=1e-7)
    learned = [t.weighting.log_variance.grad for t in (plain, summed)]  # type: ignore[union-attr]
    assert learned[0] is not None and learned[0].abs().min() > 0
    torch.testing.assert_close(learned[0], learned[1], rtol=1e-6, atol=0)
    # Sum's weights are 1: weight_<task> is the loss weight, also logged apart.
    for task in summed.config.tasks:
        assert stats[f"weight_{task}"] == pytest.approx(stats[f"loss_weight_{task}"])


def _direction_unchanged_by_task_scales(name: str) -> bool:
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    scaled = torch.tensor([0.3, 2.0, 5.0], dtype=torch.float64)[:, None] * jacobian
    directions = []
    for matrix in (jacobian, scaled):
        weights = from_name(name).weights((matrix @ matrix.T)[None],
                                          torch.Generator().manual_seed(1))[0]
        update = weights @ matrix
        directions.append(update / update.norm())
    return bool(torch.allclose(directions[0], directions[1], atol=1e-6))


@pytest.mark.parametrize("aggregator", available())
def test_refused_aggregators_are_exactly_those_that_ignore_task_scales(aggregator) -> None:
    # The reason the help gives for refusing them, checked for every registered one.
    assert _direction_unchanged_by_task_scales(aggregator) == (
        aggregator in SCALE_FREE_AGGREGATORS)


def test_combinations_refused_by_the_config() -> None:
    for weighting in WEIGHTINGS:
        for aggregator in available():
            refused = weighting_refusal(weighting, aggregator) is not None
            assert refused == (weighting in OWN_STEP or aggregator in SCALE_FREE_AGGREGATORS)
        assert weighting_refusal(weighting, None) is None


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize(("flags", "message"), [
    (["--weighting", "uncertainty", "--tasks", "sst"], "--weighting uncertainty needs at least "
     "two tasks"),
    (["--weighting", "famo", "--pcgrad"], "--weighting famo cannot be combined with "
     "--aggregator pcgrad"),
    (["--weighting", "gradnorm", "--aggregator", "upgrad"], "--weighting gradnorm cannot be "
     "combined with --aggregator upgrad"),
    (["--weighting", "dwa", "--aggregator", "nashmtl"], "--weighting dwa cannot be combined "
     "with --aggregator nashmtl"),
    (["--weighting", "famo", "--smart"], "--weighting famo cannot be combined with --smart"),
    (["--weighting", "gradnorm", "--mode", "frozen"], "--weighting gradnorm needs --mode "
     "finetune"),
    (["--weighting", "softmax"], "argument --weighting: invalid choice: 'softmax'"),
])
def test_bad_combinations_exit_2_naming_the_flag(tiny, tmp_path, capsys, flags, message) -> None:
    model_dir, data_dir = tiny
    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--no-progress", *flags]
    assert _exit_code(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_train_help_explains_the_refusals(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    text = " ".join(train.format_help().split())
    assert "--weighting {uncertainty,dwa,gradnorm,rlw,famo,imtll}" in text
    for name in (*OWN_STEP, *SCALE_FREE_AGGREGATORS):
        assert name in text.split("--weighting", 1)[1]


def test_gradnorm_reads_the_pooler_under_cls_pooling(tiny, tmp_path) -> None:
    trainer = Trainer(tiny_config(tiny, weighting="gradnorm", pooling="cls"), tmp_path / "run",
                      progress=False)
    assert trainer.weighting is not None
    assert trainer.weighting.shared == [trainer.model.encoder.pooler.weight]  # type: ignore[attr-defined]
    trainer.training_step()
    trainer.folder.release()
    grad = trainer.weighting.loss_weights.grad  # type: ignore[attr-defined]
    assert grad is not None and bool(grad.abs().sum() > 0)


def test_the_command_line_trains_with_it_and_resume_keeps_it(tiny, tmp_path, capsys) -> None:
    model_dir, data_dir = tiny
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
              "--batch-sst", "3", "--batch-para", "2", "--batch-sts", "2", "--max-length", "16",
              "--steps-per-epoch", "1", "--max-eval-examples", "2", "--no-progress",
              "--precision", "fp32", "--log-every", "1", "--no-tensorboard", "--adamw-impl",
              "for-loop"]
    assert main(["train", *common, "--weighting", "rlw", "--keep-checkpoint"]) == 0
    assert json.loads((out / "config.json").read_text())["weighting"] == "rlw"
    assert all(f"weight_{t}" in r for r in records(out) for t in ("sst", "para", "sts"))
    capsys.readouterr()
    assert _exit_code(["train", "--out", str(out), "--resume", "--weighting", "dwa"]) == 2
    assert "refusing --weighting dwa (the run has rlw)" in capsys.readouterr().err
    # One more epoch continues with the run's own weighting.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert [r["step"] for r in records(out)] == [1, 2]


@pytest.mark.parametrize("optimizer", ["adamw", "torch-adamw", "lamb"])
def test_the_loss_weights_learn_at_the_heads_rate_without_decay(tiny, tmp_path,
                                                                 optimizer) -> None:
    trainer = Trainer(tiny_config(tiny, weighting="uncertainty", weight_decay=0.5,
                                  head_lr=2e-3, optimizer=optimizer),
                      tmp_path / "run", progress=False)
    trainer.folder.release()
    assert trainer.weighting is not None
    (learned,) = trainer.weighting.parameters()
    groups = trainer.optimizer.param_groups
    (own,) = [g for g in groups if any(p is learned for p in g["params"])]
    assert own["params"] == [learned] and own["lr"] == 2e-3 and own["weight_decay"] == 0.0
    assert [g["weight_decay"] for g in groups if g is not own] == [0.5, 0.5]
    # Without a learnable weighting the groups are as before: encoder and heads.
    plain = Trainer(tiny_config(tiny, weighting="dwa"), tmp_path / "dwa", progress=False)
    plain.folder.release()
    assert len(plain.optimizer.param_groups) == 2
