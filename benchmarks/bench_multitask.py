"""Every aggregator's step against a plain summed-loss step, on a MiniLM-shaped encoder.

T tasks (T = 3 and 10 by default), each on its own batch (16 x 32 tokens) through
one shared encoder, heads cycling through SST-5-like 5-way classification, a
paraphrase logit and an STS regression, random weights, AdamW. Variants, each
with its own model copy and optimizer, timed round-robin (benchmarks/timing.py):

- ``plain``: ``sum(losses).backward()``, the cost we aim at;
- ``gradtools <name>``: ``gradtools.MultiTask(adamw, <name>)`` for every
  registered aggregator (``gradtools.aggregation.available()``);
- ``torchjd <Name>``: torchjd 0.18 ``autojac.backward`` + ``jac_to_grad`` with its
  aggregator of the same method, where it has one and it runs here (its
  Nash-MTL needs cvxpy: skipped when missing, as is anything that fails to run);
- ``flat PCGrad``: the usual flatten-and-loop PCGrad (benchmarks/baselines/flat_pcgrad.py);
- ``gradtools <name>, float32 Gram`` (``--float32-gram``): the same step with the
  Gram blocks multiplied in float32 as before issue 20 (benchmarks/baselines/
  float32_gram.py), to price the float64 accumulation side by side.

Ratios are paired: each variant's time over the plain step's in the same round,
then the median over rounds, so load drifting over the run cancels out.

    .venv/bin/python benchmarks/bench_multitask.py [--tasks 3 10] [--repeats 3]
        [--threads 1] [--layers 6] [--aggregators pcgrad mean ...] [--no-baselines]
        [--float32-gram]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradtools
from bert_demo.model import BertConfig, BertModel
from gradtools import aggregation as agg

try:
    from benchmarks.baselines.flat_pcgrad import FlatPCGrad
    from benchmarks.baselines.float32_gram import float32_gram_blocks
    from benchmarks.bench_pcgrad import adamw, minilm_config
    from benchmarks.timing import median_ms, time_interleaved
except ImportError:  # run as a script: benchmarks/ is on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.baselines.flat_pcgrad import FlatPCGrad
    from benchmarks.baselines.float32_gram import float32_gram_blocks
    from benchmarks.bench_pcgrad import adamw, minilm_config
    from benchmarks.timing import median_ms, time_interleaved

# torchjd's aggregator for each of our registry names (constructor arguments set
# to ours where both have them).
TORCHJD = {
    "sum": ("Sum", {}),
    "mean": ("Mean", {}),
    "random": ("Random", {}),
    "pcgrad": ("PCGrad", {}),
    "mgda": ("MGDA", {}),
    "cagrad": ("CAGrad", {"c": 0.4}),
    "imtlg": ("IMTLG", {}),
    "nashmtl": ("NashMTL", {"n_tasks": None}),  # filled with T
    "alignedmtl": ("AlignedMTL", {}),
    "upgrad": ("UPGrad", {}),
    "dualproj": ("DualProj", {}),
    "gradvac": ("GradVac", {}),
    "fairgrad": ("FairGrad", {"alpha": 1.0}),
    "config": ("ConFIG", {}),
}


class ManyTasks(nn.Module):
    """A shared encoder and ``num_tasks`` heads on its pooled output (three kinds, cycling)."""

    def __init__(self, config: BertConfig, num_tasks: int) -> None:
        super().__init__()
        self.encoder = BertModel(config)
        hidden = config.hidden_size
        self.heads = nn.ModuleList(
            nn.Linear(hidden, 5 if t % 3 == 0 else 1) for t in range(num_tasks)
        )

    def head_loss(self, task: int, pooled: Tensor, target: Tensor) -> Tensor:
        out = self.heads[task](pooled)
        if task % 3 == 0:
            return F.cross_entropy(out, target)
        if task % 3 == 1:
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), target)
        return F.mse_loss(out.squeeze(-1), target)


def make_inputs(
    config: BertConfig, num_tasks: int, batch: int, tokens: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(ids, mask, target) per task."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in range(num_tasks):
        ids = torch.randint(1, config.vocab_size, (batch, tokens), generator=gen)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[: batch // 2, tokens * 3 // 4 :] = 0  # some padding, as real batches have
        if t % 3 == 0:
            target = torch.randint(0, 5, (batch,), generator=gen)
        elif t % 3 == 1:
            target = torch.randint(0, 2, (batch,), generator=gen).float()
        else:
            target = 5 * torch.rand(batch, generator=gen)
        out.append((ids, mask, target))
    return out


def make_variants(
    base: ManyTasks,
    inputs: list[tuple[Tensor, Tensor, Tensor]],
    names: list[str],
    baselines: bool,
    float32_gram: bool = False,
) -> dict[str, Callable[[], None]]:
    variants: dict[str, Callable[[], None]] = {}
    num_tasks = len(inputs)

    def losses_of(model: ManyTasks) -> list[Tensor]:
        return [
            model.head_loss(t, model.encoder(ids, mask).pooler_output, target)
            for t, (ids, mask, target) in enumerate(inputs)
        ]

    plain_model = copy.deepcopy(base)
    plain_opt = adamw(list(plain_model.parameters()))

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        sum(losses_of(plain_model)).backward()  # type: ignore[union-attr]
        plain_opt.step()

    variants["plain"] = plain

    for name in names:
        model = copy.deepcopy(base)
        opt = gradtools.MultiTask(
            adamw(list(model.parameters())), name, generator=torch.Generator().manual_seed(0)
        )

        def ours(model: ManyTasks = model, opt: gradtools.MultiTask = opt) -> None:
            opt.zero_grad(set_to_none=True)
            opt.backward(losses_of(model))
            opt.step()

        variants[f"gradtools {name}"] = ours
        if float32_gram:
            model32 = copy.deepcopy(base)
            opt32 = gradtools.MultiTask(
                adamw(list(model32.parameters())), name, generator=torch.Generator().manual_seed(0)
            )

            def old_gram(model: ManyTasks = model32, opt: gradtools.MultiTask = opt32) -> None:
                with float32_gram_blocks():
                    opt.zero_grad(set_to_none=True)
                    opt.backward(losses_of(model))
                    opt.step()

            variants[f"gradtools {name}, float32 Gram"] = old_gram
        if baselines and name in TORCHJD:
            step = _torchjd_step(base, name, num_tasks, losses_of)
            if step is not None:
                variants[f"torchjd {TORCHJD[name][0]}"] = step
        if baselines and name == "pcgrad":
            flat_model = copy.deepcopy(base)
            flat_opt = FlatPCGrad(adamw(list(flat_model.parameters())))

            def flat(model: ManyTasks = flat_model, opt: FlatPCGrad = flat_opt) -> None:
                opt.zero_grad()
                opt.backward(losses_of(model))
                opt.step()

            variants["flat PCGrad"] = flat
    return variants


def _torchjd_step(
    base: ManyTasks, name: str, num_tasks: int, losses_of: Callable[[ManyTasks], list[Tensor]]
) -> Callable[[], None] | None:
    try:
        import torchjd.aggregation as jd
        from torchjd.autojac import backward as jd_backward
        from torchjd.autojac import jac_to_grad
    except ImportError:  # the bench extra is not installed
        return None
    cls_name, kwargs = TORCHJD[name]
    kwargs = {k: (num_tasks if v is None else v) for k, v in kwargs.items()}
    model = copy.deepcopy(base)
    params = list(model.parameters())
    opt = adamw(params)
    try:
        aggregator = getattr(jd, cls_name)(**kwargs)
    except Exception as error:  # a missing optional solver (cvxpy, ...)
        print(f"torchjd {cls_name}: skipped ({type(error).__name__}: {error})", file=sys.stderr)
        return None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        jd_backward(losses_of(model), inputs=params)
        jac_to_grad(params, aggregator)
        opt.step()

    try:
        step()
    except Exception as error:
        print(f"torchjd {cls_name}: skipped ({type(error).__name__}: {error})", file=sys.stderr)
        return None
    return step


def table(title: str, times: dict[str, list[float]]) -> str:
    rows = [f"| {title} | median ms | / plain (paired median) |", "|---|---:|---:|"]
    plain = times["plain"]
    for name, samples in times.items():
        paired = statistics.median(t / p for t, p in zip(samples, plain, strict=True))
        rows.append(f"| {name} | {median_ms(samples):.0f} | {paired:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="*", default=[3, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--aggregators", nargs="*", default=None, help="default: all registered")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip torchjd and flatten-and-loop"
    )
    parser.add_argument(
        "--float32-gram",
        action="store_true",
        help="add each aggregator with the Gram blocks multiplied in float32 (before issue 20)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    names = args.aggregators or agg.available()
    print(
        f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, MiniLM shape with "
        f"{args.layers} layers, one batch of {args.batch} x {args.tokens} tokens per task, "
        f"{args.repeats} rounds"
    )
    config = minilm_config(args.layers)
    for num_tasks in args.tasks:
        torch.manual_seed(0)
        base = ManyTasks(config, num_tasks)
        inputs = make_inputs(config, num_tasks, args.batch, args.tokens)
        variants = make_variants(base, inputs, names, not args.no_baselines, args.float32_gram)
        times = time_interleaved(variants, repeats=args.repeats, warmup=1)
        print()
        print(table(f"T = {num_tasks}, separate batches", times))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
