"""Issue 20's reproductions (items 1, 2 and 5) as counts over seeded draws: accuracy, not speed.

Run on a checkout before and after the fix to compare:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision_reproductions.py

- UPGrad/DualProj on one shared 1-element float32 parameter, loss_i = c_i p with
  mixed-sign c_i (exact update 0), granularity="tensor", T in {3, 5}, 100 draws
  each: draws whose .grad conflicts with a task beyond 4 eps32 rms max|c|.
- AlignedMTL/ConFIG/IMTL-G: the float32 model's update against the float64
  model's on the same Jacobian (rank-2 4 x 3; T = 5 with 1-3 elements; rank 2
  through three float32 layers).
- CAGrad(c=2) on strongly Pareto-stationary Jacobians (v'J = 0, v > 0; T 3-6,
  D 2-11), float64 and float32: inputs given a non-zero update.
- IMTL-G on rank-one rows whose signs differ: the update for two row orders.
"""

from __future__ import annotations

import numpy as np
import torch

import gradtools


def step(name: object, jac: torch.Tensor, granularity: str = "all") -> torch.Tensor:
    """.grad of one MultiTask step with loss_i = <J_i, p> (float64 copy)."""
    p = torch.nn.Parameter(torch.zeros(jac.shape[1], dtype=jac.dtype))
    opt = gradtools.MultiTask(
        torch.optim.SGD([p], lr=0.1), name, granularity=granularity, shared_params=[p]
    )
    opt.zero_grad()
    opt.backward([(jac[i] * p).sum() for i in range(jac.shape[0])])
    assert p.grad is not None
    return p.grad.double()


def dual_cone_on_one_element() -> None:
    eps = torch.finfo(torch.float32).eps
    for name in ("upgrad", "dualproj"):
        bad, sizes = 0, []
        for num_tasks in (3, 5):
            for seed in range(100):
                g = torch.Generator().manual_seed(seed)
                c = torch.randn(num_tasks, generator=g)
                while (c > 0).all() or (c < 0).all():
                    c = torch.randn(num_tasks, generator=g)
                grad = float(step(name, c[:, None], "tensor"))
                rms = float(c.pow(2).mean().sqrt())
                sizes.append(abs(grad) / rms)
                if float((c * grad).min()) < -4 * eps * rms * float(c.abs().max()):
                    bad += 1
        print(
            f"{name}, 1-element float32 tensor: {bad}/200 draws conflict; "
            f"|update|/rms median {np.median(sizes):.1e}, max {max(sizes):.1e}"
        )


def float32_against_float64() -> None:
    def through_layers(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        b = torch.randn(2, 50, generator=g, dtype=torch.float64)
        a = torch.randn(4, 2, generator=g, dtype=torch.float64)
        layers = [torch.randn(50, 50, generator=g, dtype=torch.float64) / 50**0.5 for _ in range(3)]
        return a, b, layers

    def layered_step(name: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
        a, b, layers = through_layers(seed)
        p = torch.nn.Parameter(torch.zeros(50, dtype=dtype))
        opt = gradtools.MultiTask(torch.optim.SGD([p], lr=0.1), name, shared_params=[p])
        opt.zero_grad()

        def features() -> torch.Tensor:
            h = p
            for w in layers:
                h = w.to(dtype) @ h
            return b.to(dtype) @ h

        opt.backward([(a[i].to(dtype) * features()).sum() for i in range(4)])
        assert p.grad is not None
        return p.grad.double()

    cases = {
        "rank-2 4 x 3": lambda r: r.standard_normal((4, 2)) @ r.standard_normal((2, 3)),
        "T = 5, 1-3 elements": lambda r: r.standard_normal((5, int(r.integers(1, 4)))),
    }
    for name in ("alignedmtl", "config", "imtlg"):
        for label, make in cases.items():
            diffs = []
            for seed in range(100):
                jac = torch.tensor(make(np.random.default_rng(seed)))
                ours, exact = step(name, jac.float()), step(name, jac)
                diffs.append(float((ours - exact).norm() / exact.norm().clamp(min=1e-300)))
            report(name, label, diffs)
        diffs = []
        for seed in range(50):
            ours, exact = (
                layered_step(name, seed, torch.float32),
                layered_step(name, seed, torch.float64),
            )
            scale = max(float(exact.norm()), float(ours.norm()), 1e-300)
            diffs.append(float((ours - exact).norm()) / scale)
        report(name, "rank 2 through 3 float32 layers", diffs)


def report(name: str, label: str, diffs: list[float]) -> None:
    off = sum(d > 0.01 for d in diffs)
    print(
        f"{name}, {label}: float32 vs float64 model off by >1% on {off}/{len(diffs)}, "
        f"median {np.median(diffs):.1e}"
    )


def cagrad_at_stationary_points() -> None:
    for dtype in (torch.float64, torch.float32):
        moved, worst_cos, largest = 0, 1.0, 0.0
        for seed in range(100):
            r = np.random.default_rng(seed)
            num_tasks, dim = int(r.integers(3, 7)), int(r.integers(2, 12))
            v = r.uniform(0.1, 1.0, num_tasks)
            jac = r.standard_normal((num_tasks, dim))
            jac[-1] -= (v @ jac) / v[-1]
            j = torch.tensor(jac, dtype=dtype)
            d = step(gradtools.aggregation.CAGrad(c=2.0), j)
            norms = j.double().norm(dim=1)
            if float(d.norm()) > 1e-6 * float(norms.max()):
                moved += 1
                cos = (j.double() @ d) / (norms * d.norm())
                worst_cos = min(worst_cos, float(cos.min()))
                largest = max(largest, float(d.norm() / norms.max()))
        print(
            f"cagrad c=2, {str(dtype)[6:]}: non-zero update on {moved}/100 stationary inputs "
            f"(min cosine {worst_cos:.2f}, largest |d|/max|g| {largest:.1e})"
        )


def imtlg_without_equal_angle() -> None:
    v = torch.tensor([0.3, -1.2, 0.7])
    jac = torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None] * v[None, :]
    a, b = step("imtlg", jac), step("imtlg", jac.flip(0))
    change = float((a - b).norm()) / max(float(a.norm()), float(b.norm()), 1e-300)
    print(f"imtlg, rank-one rows of mixed signs: change between two row orders {change:.1%}")


if __name__ == "__main__":
    dual_cone_on_one_element()
    float32_against_float64()
    cagrad_at_stationary_points()
    imtlg_without_equal_angle()
