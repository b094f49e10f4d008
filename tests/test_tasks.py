"""The task table: consistent, read by every module, and enough to add a task (CFIMDB)."""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from demo_fixtures import write_tiny_data, write_tiny_model

from bert_demo.config import TrainConfig
from bert_demo.model import load_pretrained
from bert_demo.model.multitask import MultitaskBert
from bert_demo.tasks import PAPER_TASKS, TASKS, get_task, guess_task, model_tasks
from bert_demo.training.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_task_names_a_batch_setting_and_a_unique_metric() -> None:
    settings = {f.name for f in fields(TrainConfig)}
    assert all(task.batch_setting in settings for task in TASKS.values())
    metrics = [task.metric_name for task in TASKS.values()]
    assert len(set(metrics)) == len(metrics)
    assert TrainConfig().batch_size("para") == TrainConfig().batch_para


def test_names_aliases_and_file_names() -> None:
    assert get_task("quora") is TASKS["para"]
    assert TASKS["para"].file_name("dev") == "quora-dev.csv"
    assert [guess_task(f"{t.file_prefix}-dev.csv") for t in TASKS.values()] == list(TASKS)
    with pytest.raises(ValueError, match="unknown task 'nli'"):
        get_task("nli")
    # The paper's three always get heads (and are evaluated); others when trained.
    assert model_tasks(("sst",)) == PAPER_TASKS
    assert model_tasks(("cfimdb", "sst")) == (*PAPER_TASKS, "cfimdb")


def test_old_checkpoint_head_names_still_load(tmp_path: Path) -> None:
    """Runs saved before the task table kept sst_head.* and pair_heads.<task>.*."""
    encoder_dir = write_tiny_model(tmp_path / "model")
    torch.manual_seed(0)
    model = MultitaskBert(load_pretrained(encoder_dir))
    old = {k.replace("heads.sst.", "sst_head.").replace("heads.", "pair_heads."): v
           for k, v in model.state_dict().items()}
    assert any(k.startswith("sst_head.") for k in old)
    torch.manual_seed(1)
    fresh = MultitaskBert(load_pretrained(encoder_dir))
    fresh.load_state_dict(old)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_cfimdb_trains_from_its_table_record_alone(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "model")
    data_dir = write_tiny_data(tmp_path / "data")
    # CFIMDB files: the SST sentences with a binary label (sentiment >= 2).
    rows = (data_dir / "ids-sst-train.csv").read_text().splitlines()
    binary = [rows[0]] + ["\t".join([*r.split("\t")[:3], str(int(int(r.split("\t")[3]) >= 2))])
                          for r in rows[1:]]
    (data_dir / "ids-cfimdb-train.csv").write_text("\n".join(binary) + "\n")
    shutil.copy(data_dir / "ids-cfimdb-train.csv", data_dir / "ids-cfimdb-dev.csv")
    config = TrainConfig(model=str(model_dir), data=str(data_dir), tasks=("sst", "cfimdb"),
                         batch_sst=3, batch_cfimdb=4, max_length=16, epochs=1,
                         steps_per_epoch=2, eval_batch_size=4, aggregator="pcgrad", smart=True)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    head = trainer.model.heads["cfimdb"]
    before = [p.detach().clone() for p in head.parameters()]
    final = trainer.run()
    assert head[1].out_features == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))
    assert 0.0 <= final["dev"]["cfimdb_acc"] <= 1.0 and "overall" in final["dev"]
