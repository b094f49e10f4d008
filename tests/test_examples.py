"""Every script in examples/ runs, at a tiny size, and its printed training loss falls.

The scripts run in this process (runpy, as `python examples/NAME.py ...` would
run them) so that torch, transformers and Lightning are imported once for all.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LOSS_LINE = re.compile(r"^step\s+(\d+)\s+loss\s+([0-9.]+)", re.MULTILINE)


def run_example(name: str, args: list[str], capsys: pytest.CaptureFixture[str],
                monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the scripts import toy_tasks beside them
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def assert_loss_falls(out: str, lines: int) -> None:
    losses = [float(loss) for _, loss in LOSS_LINE.findall(out)]
    assert len(losses) == lines, out
    # Each printed loss is the mean task loss over the last --log-every steps.
    assert losses[-1] < 0.9 * losses[0], losses


def test_two_head_mlp(one_thread, capsys, monkeypatch) -> None:
    out = run_example("two_head_mlp.py", ["--steps", "40", "--log-every", "10"], capsys, monkeypatch)
    assert_loss_falls(out, 4)


def test_hf_bert_pcgrad_smart(one_thread, capsys, monkeypatch) -> None:
    pytest.importorskip("transformers")
    out = run_example("hf_bert_pcgrad_smart.py", ["--steps", "30", "--log-every", "10"],
                      capsys, monkeypatch)
    assert_loss_falls(out, 3)
    # SMART ran at its configured radius (epsilon 1e-4): printed as |delta|max.
    assert re.findall(r"\|delta\|max ([0-9.e+-]+)", out) == ["1.0e-04"] * 3, out


def test_hf_trainer_recipe(one_thread, capsys, monkeypatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    out = run_example("hf_trainer.py", ["--steps", "30", "--log-every", "10"], capsys, monkeypatch)
    assert_loss_falls(out, 3)
    before, after = map(float, re.findall(
        r"before clipping up to ([0-9.]+), after up to ([0-9.]+)", out)[-1])
    assert before > 1.0, "the clip was never exercised; the test would not see it fail"
    assert after <= 1.0 + 1e-4  # the Trainer's max_grad_norm clip acted on PCGrad's gradient


@pytest.mark.filterwarnings("ignore:.*treespec.*")  # Lightning's own use of a torch API it wraps
def test_lightning_recipe(one_thread, capsys, monkeypatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    out = run_example("lightning_manual.py", ["--steps", "30", "--log-every", "10"], capsys, monkeypatch)
    assert_loss_falls(out, 3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_amp_gradscaler_recipe(dtype, one_thread, capsys, monkeypatch) -> None:
    out = run_example("amp_gradscaler.py", ["--steps", "40", "--log-every", "10", "--device", "cpu",
                                            "--dtype", dtype], capsys, monkeypatch)
    assert_loss_falls(out, 4)
    scales = {float(s) for s in re.findall(r"scale ([0-9.]+)", out)}
    # float16: the GradScaler scales the losses; bfloat16 needs none (a disabled scaler's 1).
    assert scales and (min(scales) > 1 if dtype == "float16" else scales == {1.0}), out


def test_ddp_recipe_in_one_process(one_thread, capsys, monkeypatch) -> None:
    out = run_example("ddp_torchrun.py", ["--steps", "40", "--log-every", "10"], capsys, monkeypatch)
    assert_loss_falls(out, 4)
    assert "processes 1" in out


@pytest.mark.slow  # torchrun and two workers importing torch: ~10-20 s on 2 cores
def test_ddp_recipe_under_torchrun_with_two_processes(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU
            "GLOO_SOCKET_IFNAME": "lo"}
    # c10d rendezvous on loopback, port 0: the launcher picks a free port, so runs in parallel
    # (another test's torchrun, another checkout's suite) never race for torchrun's default port.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                           "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                           "--rdzv-endpoint", "127.0.0.1:0",
                           str(EXAMPLES / "ddp_torchrun.py"), "--steps", "40", "--log-every", "10"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_loss_falls(done.stdout, 4)
    assert done.stdout.count("processes 2") == 4, done.stdout  # rank 0 alone prints


def test_accelerate_recipe(one_thread, capsys, monkeypatch) -> None:
    pytest.importorskip("accelerate")
    out = run_example("accelerate_loop.py", ["--steps", "40", "--log-every", "10"], capsys, monkeypatch)
    assert_loss_falls(out, 4)


@pytest.mark.parametrize(
    "choice", [["--aggregator", "upgrad"], ["--weighting", "uncertainty"], ["--weighting", "dwa"]]
)
def test_shared_batch(choice: list[str], one_thread, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = run_example("shared_batch.py", ["--steps", "40", "--log-every", "10", *choice], capsys, monkeypatch)
    assert_loss_falls(out, 4)
