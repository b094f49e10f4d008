"""examples/toy_pareto.py: the CAGrad / Nash-MTL two-task toy, at a size that runs in seconds.

The papers' protocol is Adam lr 1e-3 for 35,000 steps; here Adam takes 200
steps of lr 0.1 (the same distance in x), which is enough for MGDA, Nash-MTL and
FairGrad (the script's CLAIMS_FRONT) to reach the front from all five starts.
Not covered here: the other aggregators' endpoints (CAGrad, UPGrad, LS and
PCGrad stay in the valley from (9, 9), as in the Nash-MTL paper's figure for
CAGrad, LS and PCGrad), and the papers' exact protocol (35,000 steps of lr 1e-3),
which the full-length run checks.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


TOY = runpy.run_path(str(EXAMPLES / "toy_pareto.py"), run_name="toy_pareto")


@pytest.fixture(scope="module")
def toy():
    return TOY


def test_script_runs_and_writes_its_png(one_thread, tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("matplotlib")  # the demo extra
    out = tmp_path / "toy.png"
    argv = ["toy_pareto.py", "--steps", "3", "--aggregators", "sum", "nashmtl", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / "toy_pareto.py"), run_name="__main__")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.count("distance") == 10  # 2 aggregators x 5 starts


def test_the_front_is_the_quadratics_segment(toy) -> None:
    """The grid front runs from task 1's minimum to task 2's, near x = (7, -8) and (-7, -8)
    (the tanh factor moves them by about 0.3 in x2, 3e-3 in the losses)."""
    front = toy["pareto_front"]()
    ends = toy["losses_at"](np.array([[7.0, -8.0], [-7.0, -8.0]]))
    assert 0 < ends[0, 0] - front[:, 0].min() < 1e-2
    assert 0 < ends[1, 1] - front[:, 1].min() < 1e-2


@pytest.mark.parametrize("name", TOY["CLAIMS_FRONT"])
def test_default_aggregators_reach_the_front_from_the_papers_starts(one_thread, toy, name) -> None:
    front = toy["pareto_front"]()
    for start in toy["STARTS"]:
        path = toy["trajectory"](name, start, 200, 0.1)
        end = toy["losses_at"](path[-1:])[0]
        assert toy["distance_to_front"](end, front) <= toy["FRONT_TOLERANCE"], (start, end)


def test_nash_max_norm_holds_on_the_front_through_multitask(one_thread, toy) -> None:
    """On the toy's front the two float32 gradients are almost exactly opposite; the old clip
    let 148 of these 400 updates exceed max_norm=1 (up to about 8)."""
    import torch

    import gradtools
    from gradtools import aggregation as agg

    x = torch.nn.Parameter(torch.tensor([9.0, -1.0]))
    opt = gradtools.MultiTask(torch.optim.Adam([x], lr=0.05), agg.NashMTL(max_norm=1.0))
    norms = []
    for _ in range(400):
        opt.zero_grad()
        opt.backward(list(toy["toy_losses"](x)))
        norms.append(float(x.grad.norm()))
        opt.step()
    assert max(norms) <= 1.0 + 1e-3  # float32 rounding of the weighted sum
    assert (
        toy["distance_to_front"](
            toy["losses_at"](x.detach().double().numpy()[None])[0], toy["pareto_front"]()
        )
        <= toy["FRONT_TOLERANCE"]
    )
