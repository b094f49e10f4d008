"""bert_demo training on two CPU processes (gloo): sharding, averaging, rank-0 side effects, resume.

Two launches, both on the tiny random-weight model of demo_fixtures:

- torch.multiprocessing (rank_launcher.py) runs Trainer in each process, so the
  test can look inside: replicas equal, checkpoints written by rank 0 only, a
  two-process run equal to one process on the same global batches, and an
  interrupted-and-resumed run equal to an uninterrupted one.
- torchrun runs the real command line, ``-m bert_demo train``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from demo_fixtures import write_tiny_data, write_tiny_model
from rank_launcher import run_ranks

import bert_demo.training.train as train_module
from bert_demo.config import TrainConfig
from bert_demo.run_folder.dev_predictions import DEV_PREDICTIONS
from bert_demo.run_folder.folder import RunFolder
from bert_demo.run_folder.run_dir import CHECKPOINT, FINAL, METRICS, RunDirError
from bert_demo.training.distributed import Ranks
from bert_demo.training.train import Trainer

WORLD = 2
REPO = Path(__file__).resolve().parents[1]


def tiny_settings(model_dir: Path, data_dir: Path, **overrides: Any) -> dict[str, Any]:
    # Batch sizes are per process. The tiny data has 10 SST rows and 8 of each pair
    # task, so two processes' global batches (6, 4 and 4) split evenly: every rank
    # holds the same number of rows and no row is repeated to pad.
    settings: dict[str, Any] = {
        "model": str(model_dir), "data": str(data_dir),
        "batch_sst": 3, "batch_para": 2, "batch_sts": 2, "max_length": 16,
        "epochs": 2, "lr": 1e-3, "eval_batch_size": 4, "log_every": 1,
        "length_buckets": 2, "pooling": "mean",
    }
    return {**settings, **overrides}


# Without dropout and SMART noise (random streams differ per rank) the two-process
# run is the one-process run on the union of the ranks' rows. RAdam, because its
# first steps are momentum SGD, linear in the gradient: AdamW's first steps are
# lr * g / |g| per component, which turns a gradient that is zero up to rounding
# (an attention key bias, say) into a full +-lr step whose sign is noise.
EXACT = {"encoder_dropout": 0.0, "head_dropout": 0.0, "max_steps": 3, "optimizer": "radam"}
# The summed loss (gradients averaged after backward) and PCGrad (task gradients
# averaged before the surgery).
EXACT_RUNS = {"exact_sum": EXACT, "exact_pcgrad": {**EXACT, "aggregator": "pcgrad"}}
EVERYTHING = {"aggregator": "pcgrad", "smart": True, "sts_aug": True}
STOP_AT = 3  # mid-epoch, after the epoch-end checkpoint at step 2


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Interrupt:
    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, current: int) -> None:
        if current == self.step:
            raise KeyboardInterrupt


def _demo_worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    model_dir, data_dir, out = Path(root) / "model", Path(root) / "data", Path(root) / "runs"
    ranks = Ranks(rank, world, rank, dist.group.WORLD)
    saves = []
    original_save = RunFolder.save_checkpoint

    def counting_save(self: RunFolder, state: dict[str, Any]) -> Path:
        saves.append(self.path.name)
        return original_save(self, state)

    RunFolder.save_checkpoint = counting_save  # type: ignore[method-assign]
    drawn: list[tuple[str, list[str]]] = []  # (task, row ids) of each training batch
    original_make_batch = train_module.make_batch

    def recording_make_batch(task: str, examples: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.append((task, [e.id for e in examples]))
        return original_make_batch(task, examples, *args, **kwargs)

    def trainer(name: str, settings: dict[str, Any], **kwargs: Any) -> Trainer:
        config = TrainConfig(**tiny_settings(model_dir, data_dir, **settings))
        return Trainer(config, out / name, progress=False, ranks=ranks, **kwargs)

    results: dict[str, Any] = {}
    for name, settings in EXACT_RUNS.items():
        # Record the training rows this rank drew in the first run.
        train_module.make_batch = (
            recording_make_batch if name == "exact_sum" else original_make_batch
        )
        run = trainer(name, settings)
        results[name] = {"final": run.run(), "weights": weights(run.model)}
    train_module.make_batch = original_make_batch
    results["drawn"] = drawn
    # Rank 0 alone checks the run folder; its refusal must stop every rank.
    try:
        trainer("exact_sum", EXACT)
        results["reused_folder"] = "no error"
    except RunDirError as error:
        results["reused_folder"] = str(error)

    straight = trainer("straight", EVERYTHING)
    straight.run()
    try:
        trainer("resumed", EVERYTHING, on_step=_Interrupt(STOP_AT)).run()
        raise AssertionError("the interrupt did not stop the run")
    except KeyboardInterrupt:
        pass
    # Kept: the test below resumes it again with another number of processes.
    resumed = trainer("resumed", EVERYTHING, resume=True, keep_checkpoint=True)
    resumed_final = resumed.run()
    assert resumed.smart is not None and straight.smart is not None
    results["straight"] = {
        "weights": weights(straight.model),
        "teacher": weights(straight.smart.teacher.module),
    }
    results["resumed"] = {
        "final": resumed_final,
        "weights": weights(resumed.model),
        "teacher": weights(resumed.smart.teacher.module),
    }
    results["saves"] = saves
    torch.save(results, Path(root) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_ddp")
    write_tiny_model(root / "model")
    write_tiny_data(root / "data")
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # two spawned processes, four short runs each: ~20-40 s on 2 cores
def test_two_processes_train_like_one_and_resume_exactly(tiny: Path) -> None:
    run_ranks(_demo_worker, WORLD, str(tiny), timeout_s=300)
    ranks = [torch.load(tiny / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    runs = tiny / "runs"

    # One pass over the data (the first two steps): each rank drew a disjoint share
    # of every task's rows, the same number of rows, and together all of them.
    tasks = ("sst", "para", "sts")
    for t, task in enumerate(tasks):
        shares = [
            [i for k in (t, t + len(tasks)) for i in ranks[r]["drawn"][k][1]] for r in range(WORLD)
        ]
        assert all(ranks[r]["drawn"][t][0] == task for r in range(WORLD))
        assert len(shares[0]) == len(shares[1])
        assert not set(shares[0]) & set(shares[1])
        rows = 10 if task == "sst" else 8
        assert len(set(shares[0]) | set(shares[1])) == len(shares[0]) + len(shares[1]) == rows

    assert all("already holds a run" in ranks[r]["reused_folder"] for r in range(WORLD))

    # The ranks agree, to the bit, on the weights and on the teacher.
    for key in ("exact_sum", "exact_pcgrad", "straight", "resumed"):
        for name, value in ranks[0][key]["weights"].items():
            assert torch.equal(ranks[1][key]["weights"][name], value), (key, name)
    for name, value in ranks[0]["resumed"]["teacher"].items():
        assert torch.equal(ranks[1]["resumed"]["teacher"][name], value), name
    assert ranks[0]["exact_sum"]["final"]["dev"] == ranks[1]["exact_sum"]["final"]["dev"]

    # Checkpoints come from rank 0 only: twice at each epoch end (before the dev
    # evaluation, so that an evaluation error cannot lose the weights, and after it,
    # with its metrics) and once on the interrupt.
    assert ranks[1]["saves"] == []
    assert ranks[0]["saves"] == (
        ["exact_sum"] * 4 + ["exact_pcgrad"] * 4 + ["straight"] * 4 + ["resumed"] * 5
    )
    # One metrics line per step and per evaluation: nothing written twice.
    records = [json.loads(x) for x in (runs / "exact_sum" / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["event"] == "eval"] == [2, 3]
    assert json.loads((runs / "exact_sum" / FINAL).read_text())["step"] == 3

    # Two processes = one process on the same global batches (twice the per-process size).
    model_dir, data_dir = tiny / "model", tiny / "data"
    doubled = {"batch_sst": 6, "batch_para": 4, "batch_sts": 4}
    for name, settings in EXACT_RUNS.items():
        single = Trainer(
            TrainConfig(**tiny_settings(model_dir, data_dir, **settings, **doubled)),
            tiny / f"single_{name}", progress=False,
        )
        single.run()
        for key, want in weights(single.model).items():
            torch.testing.assert_close(
                ranks[0][name]["weights"][key], want, rtol=0, atol=1e-6,
                msg=lambda m, name=name, key=key: f"{name} {key}: {m}",
            )

    # Interrupted at step 3 and resumed = uninterrupted, with every rank's random
    # streams (dropout, SMART noise) restored from the checkpoint.
    assert ranks[0]["resumed"]["final"]["step"] == 4
    for name, want in ranks[0]["straight"]["weights"].items():
        assert torch.equal(ranks[0]["resumed"]["weights"][name], want), name
    for name, want in ranks[0]["straight"]["teacher"].items():
        assert torch.equal(ranks[0]["resumed"]["teacher"][name], want), name

    # A checkpoint of two processes does not resume in one: the batches would differ.
    config = TrainConfig(**tiny_settings(model_dir, data_dir, **EVERYTHING))
    with pytest.raises(RunDirError, match="nproc_per_node 2"):
        Trainer(config, runs / "resumed", resume=True, progress=False)


@pytest.mark.slow  # torchrun and two workers importing torch: ~15-30 s on 2 cores
def test_torchrun_runs_the_command_line(tiny: Path) -> None:
    out = tiny / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(WORLD),
        # c10d rendezvous on loopback, port 0: the launcher picks a free port itself.
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        "-m", "bert_demo", "train",
        "--model", str(tiny / "model"), "--data", str(tiny / "data"), "--out", str(out),
        "--batch-sst", "3", "--batch-para", "2", "--batch-sts", "2", "--max-length", "16",
        "--epochs", "1", "--max-steps", "2", "--lr", "1e-3", "--eval-batch-size", "4",
        "--log-every", "1", "--pcgrad", "--smart", "--device", "cpu", "--no-progress",
        "--threads", "1", "--keep-checkpoint", "--no-tensorboard",
        "--adamw-impl", "for-loop", "--precision", "fp32",
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tiny, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        # torchrun's summary comes last; the worker's own error is usually earlier.
        clues = [line for line in done.stderr.splitlines()
                 if any(w in line for w in ("Error", "error", "terminate", "what()", "Exception"))]
        pytest.fail("torchrun failed:\n" + "\n".join(clues[:40]) + "\n--- stderr tail ---\n"
                    + done.stderr[-4000:] + "\n--- stdout tail ---\n" + done.stdout[-2000:])

    # Rank 0 alone printed the summary and wrote the run folder.
    assert done.stdout.count('"out"') == 1, done.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", CHECKPOINT, METRICS, FINAL, "best.safetensors", "model.safetensors",
         "encoder", DEV_PREDICTIONS, "best.json"]
    )
    records = [json.loads(x) for x in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
    assert [r["step"] for r in records if r["event"] == "eval"] == [2]
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["step"] == 2 and state["world_size"] == WORLD
    assert len(state["rank_rng"]) == WORLD
    assert not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])


# ---------------------------------------------------------------------- no processes needed


def as_rank(rank: int, world: int) -> Ranks:
    # shard() only reads rank and world size; any group object marks it distributed.
    return Ranks(rank, world, rank, group=object())  # type: ignore[arg-type]


def test_shard_gives_each_rank_a_disjoint_equal_share() -> None:
    rows = [7, 3, 9, 1, 4, 8]
    shares = [as_rank(r, 3).shard(rows) for r in range(3)]
    assert shares == [[7, 1], [3, 4], [9, 8]]
    # The end of a pass: 4 rows over 3 ranks. Padded by repeating the batch's first
    # rows (as DistributedSampler does), so every rank has as many rows.
    shares = [as_rank(r, 3).shard([5, 6, 2, 0]) for r in range(3)]
    assert shares == [[5, 0], [6, 5], [2, 6]]
    assert Ranks().shard(rows) == rows  # one process: the whole batch


def test_from_env_outside_torchrun_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from bert_demo.training.distributed import from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks, device = from_env("cpu")
    assert (ranks.rank, ranks.world_size, ranks.distributed, device) == (0, 1, False, "cpu")


@pytest.mark.parametrize(
    ("env", "device", "message"),
    [
        ({"RANK": None}, "cpu", "RANK is not set"),
        ({}, "cuda:1", "--device cuda:1: under torchrun each process uses cuda:LOCAL_RANK"),
        ({}, "meta", "--device meta: torchrun training supports cpu"),
    ],
)
def test_from_env_errors_name_the_problem(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str | None], device: str, message: str
) -> None:
    from bert_demo.training.distributed import from_env

    base: dict[str, str | None] = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in {**base, **env}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        from_env(device)
    assert not dist.is_initialized()


def test_only_train_runs_under_torchrun(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from bert_demo.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--run", "nowhere"])
    assert exit_info.value.code == 2
    assert "only 'train' runs under torchrun" in capsys.readouterr().err


def test_rank_seeds_differ_per_rank_and_refuse_rank_0() -> None:
    from bert_demo.training.distributed import rank_seed

    assert len({rank_seed(0, r) for r in range(1, 9)}) == 8
    assert rank_seed(0, 1) != rank_seed(1, 1)
    with pytest.raises(ValueError, match="ranks > 0"):
        rank_seed(0, 0)


def test_errors_that_cannot_travel_between_ranks_keep_their_text() -> None:
    from bert_demo.training.distributed import _picklable

    plain = RunDirError("already holds a run")
    assert _picklable(plain) is plain

    class Local(Exception):  # defined in a function: pickle cannot find it by name
        pass

    converted = _picklable(Local("disk full"))
    assert type(converted) is RuntimeError and str(converted) == "Local: disk full"


def test_a_finished_worker_exits_with_its_output_flushed_and_its_code() -> None:
    # exit_process skips the interpreter's teardown (see its docstring): what the worker
    # printed into a pipe's buffer must still arrive, and the exit code must be the one given.
    script = ("import sys\n"
              "from bert_demo.training.distributed import Ranks\n"
              "print('summary', end='')\n"
              "sys.stderr.write('note')\n"
              "Ranks().exit_process(3)\n"
              "print('not reached')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe buffers
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (3, "summary", "note")
