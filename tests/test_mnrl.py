"""Multiple negatives ranking loss: its value, its direction, and the settings it refuses."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from demo_fixtures import write_tiny_data, write_tiny_model

import gradtools
from bert_demo.config import TrainConfig
from bert_demo.training.mnrl import multiple_negatives_ranking_loss as mnrl
from bert_demo.training.train import Trainer


def test_value_for_orthogonal_candidates() -> None:
    # Pair i's vectors coincide and differ from every other pair's: cos = 1 on the
    # diagonal, 0 elsewhere, so each anchor's loss is -log(e^s / (e^s + (B - 1))).
    batch, scale = 4, 3.0
    u = torch.eye(batch)
    loss = mnrl(u, u.clone(), torch.ones(batch), scale)
    expected = -math.log(math.exp(scale) / (math.exp(scale) + batch - 1))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # With a smaller scale the same geometry costs more (a flatter softmax).
    assert mnrl(u, u.clone(), torch.ones(batch), 1.0).item() == pytest.approx(
        -math.log(math.e / (math.e + batch - 1)), rel=1e-5)


def test_loss_decreases_as_positives_align() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(8, 16, generator=g)
    noise = torch.randn(8, 16, generator=g)
    labels = torch.ones(8)
    losses = [mnrl(u, u + t * noise, labels, 20.0).item() for t in (4.0, 2.0, 1.0, 0.5, 0.1)]
    assert all(a > b for a, b in itertools.pairwise(losses)), losses


def test_a_gradient_step_on_the_vectors_lowers_the_loss() -> None:
    g = torch.Generator().manual_seed(1)
    u = torch.randn(6, 8, generator=g, requires_grad=True)
    v = torch.randn(6, 8, generator=g, requires_grad=True)
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    before = mnrl(u, v, labels, 20.0)
    before.backward()
    with torch.no_grad():
        after = mnrl(u - 0.05 * u.grad, v - 0.05 * v.grad, labels, 20.0)
    assert after.item() < before.item()


def test_only_duplicates_are_anchors_but_every_pair_is_a_candidate() -> None:
    g = torch.Generator().manual_seed(2)
    u = torch.randn(5, 8, generator=g, requires_grad=True)
    v = torch.randn(5, 8, generator=g, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    mnrl(u, v, labels, 20.0).backward()
    assert u.grad is not None and v.grad is not None
    assert torch.all(u.grad[labels == 0] == 0)  # non-duplicates' first questions: unused
    assert torch.all(v.grad[labels == 0].abs().sum(-1) > 0)  # their second ones: negatives
    # The reference: cross-entropy of the positives' scaled cosines.
    logits = 20.0 * F.normalize(u[[0, 2]], dim=-1) @ F.normalize(v, dim=-1).T
    assert mnrl(u, v, labels, 20.0).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 2])).item(), rel=1e-6)


def test_a_batch_without_duplicates_contributes_nothing() -> None:
    u = torch.randn(3, 4, requires_grad=True)
    loss = mnrl(u, torch.randn(3, 4), torch.zeros(3), 20.0)
    assert loss.item() == 0.0 and not loss.requires_grad


@pytest.mark.parametrize(("args", "message"), [
    ((torch.randn(1, 4), torch.randn(1, 4), torch.ones(1), 20.0), "at least 2 pairs"),
    ((torch.randn(3, 4), torch.randn(2, 4), torch.ones(3), 20.0), "must both be"),
    ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(2), 20.0), "is_positive must be"),
    ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(3), 0.0), "scale must be > 0"),
])
def test_bad_inputs_are_refused(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mnrl(*args)


@pytest.mark.parametrize(("settings", "message"), [
    ({"tasks": ("sst", "sts")}, "needs the para task"),
    ({"pair_encoding": "cross"}, "needs pair_encoding 'separate'"),
    ({"batch_para": 1}, "batch_para >= 2"),
    ({"mode": "frozen"}, "needs mode 'finetune'"),
    ({"mode": "pretrain"}, "needs mode 'finetune'"),  # the old name of frozen
])
def test_settings_where_mnrl_could_never_train_are_refused(settings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(mnrl_weight=0.5, **settings)
    TrainConfig(mnrl_weight=0.0, **settings)  # off: nothing to refuse


def test_aggregator_replaces_pcgrad() -> None:
    assert TrainConfig(aggregator="upgrad").combines_task_gradients
    with pytest.raises(ValueError, match="give one of the two"):
        TrainConfig.from_dict({"aggregator": "upgrad", "pcgrad": True})
    assert TrainConfig(aggregator="pcgrad").pcgrad
    with pytest.raises(ValueError, match="aggregator must be one of"):
        TrainConfig(aggregator="nope")
    with pytest.raises(ValueError, match="at least two tasks"):
        TrainConfig(aggregator="mean", tasks=("sst",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_tiny_data(root / "data")


def _tiny_trainer(tiny: tuple[Path, Path], out: Path, **overrides: Any) -> Trainer:
    model_dir, data_dir = tiny
    config = TrainConfig(model=str(model_dir), data=str(data_dir), batch_sst=3, batch_para=4,
                         batch_sts=2, max_length=16, epochs=1, steps_per_epoch=2, lr=1e-3,
                         eval_batch_size=4, pooling="mean", **overrides)
    return Trainer(config, out, progress=False)


@pytest.mark.usefixtures("one_thread")
def test_training_adds_mnrl_to_the_quora_loss(tiny, tmp_path) -> None:
    def first_step(out: str, **overrides: Any) -> tuple[dict[str, float], torch.Tensor]:
        trainer = _tiny_trainer(tiny, tmp_path / out, seed=3, **overrides)  # re-seeds torch
        grads: list[torch.Tensor] = []
        weight = trainer.model.encoder.layers[0].ffn_in.weight
        trainer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: grads.append(weight.grad.clone()))
        return trainer.training_step(), grads[0]

    stats, grad = first_step("mnrl", mnrl_weight=0.5)
    plain, plain_grad = first_step("plain")
    # Same batches and dropout, same task losses; MNRL is logged and adds to the gradient.
    assert stats["loss_para"] == pytest.approx(plain["loss_para"])
    assert stats["mnrl"] > 0 and "mnrl" not in plain
    assert not torch.allclose(grad, plain_grad)


@pytest.mark.usefixtures("one_thread")
def test_training_with_another_aggregator(tiny, tmp_path) -> None:
    trainer = _tiny_trainer(tiny, tmp_path / "upgrad", aggregator="upgrad")
    assert isinstance(trainer.optimizer, gradtools.MultiTask)
    assert trainer.optimizer.aggregator.name == "upgrad"
    before = [p.detach().clone() for p in trainer.model.encoder.parameters()]
    stats = trainer.training_step()
    # The step's task-gradient statistics, under names that do not depend on the
    # aggregator, and the aggregator's weight of each task.
    assert "cos_sst_para" in stats and "conflicts" in stats
    assert not any(k.startswith("pcgrad") for k in stats)
    assert {f"weight_{t}" for t in ("sst", "para", "sts")} <= set(stats)
    assert all(stats[f"weight_{t}"] > 0 for t in ("sst", "para", "sts"))
    assert any(not torch.equal(a, b) for a, b in zip(
        before, trainer.model.encoder.parameters(), strict=True))
