"""AdamW step time: gradtools.AdamW against torch.optim.AdamW, side by side.

Two parameter sets: the MiniLM-L6-H384 encoder (22.7M parameters in 103 tensors)
and BERT-base (109M in 199 tensors), random gradients, float32.

Table (the numbers in benchmarks/RESULTS.md):
    .venv/bin/python benchmarks/bench_adamw.py [--repeats 9] [--device cpu|cuda]
pytest-benchmark suite (statistics per variant):
    .venv/bin/python -m pytest benchmarks/bench_adamw.py --benchmark-only
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import pytest
import torch

import gradtools

try:
    from benchmarks.timing import ratio_table, time_interleaved
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from timing import ratio_table, time_interleaved  # type: ignore[no-redef]


def bert_shapes(
    layers: int, hidden: int, intermediate: int, vocab: int = 30522
) -> list[tuple[int, ...]]:
    """Parameter shapes of a BERT encoder with pooler, in the order of the checkpoint."""
    shapes: list[tuple[int, ...]] = [
        (vocab, hidden),
        (512, hidden),
        (2, hidden),
        (hidden,),
        (hidden,),
    ]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    return [*shapes, (hidden, hidden), (hidden,)]  # pooler


SHAPES = {
    "MiniLM-L6-H384": bert_shapes(6, 384, 1536),
    "BERT-base": bert_shapes(12, 768, 3072),
}

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "torch for-loop": lambda p: torch.optim.AdamW(p, foreach=False),
    "torch foreach": lambda p: torch.optim.AdamW(p, foreach=True),
    "torch fused": lambda p: torch.optim.AdamW(p, fused=True),
    "gradtools for-loop": lambda p: gradtools.AdamW(p, foreach=False),
    "gradtools foreach": lambda p: gradtools.AdamW(p, foreach=True),
    "gradtools fused (compiled)": lambda p: gradtools.AdamW(p, fused=True),
}


def make_stepper(name: str, shapes: list[tuple[int, ...]], device: str) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
        p.grad = torch.randn(shape, generator=generator).to(device)
        params.append(p)
    optimizer = OPTIMIZERS[name](params)
    return lambda: optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would mislabel a row
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for model in args.models:
        steppers = {name: make_stepper(name, SHAPES[model], args.device) for name in OPTIMIZERS}
        times = time_interleaved(steppers, repeats=args.repeats, warmup=2, device=args.device)
        print()
        print(ratio_table(f"AdamW step, {model}", times, ["torch foreach", "torch fused"]))


@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_adamw_step(benchmark: pytest.FixtureRequest, model: str, name: str) -> None:
    stepper = make_stepper(name, SHAPES[model], "cpu")
    stepper()  # compile / allocate state outside the timing
    benchmark.group = f"AdamW {model}"  # type: ignore[attr-defined]
    benchmark(stepper)  # type: ignore[operator]


if __name__ == "__main__":
    main()
