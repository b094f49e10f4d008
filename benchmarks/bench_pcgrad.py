"""PCGrad step time and peak memory, side by side, on a MiniLM-shaped encoder.

Two settings, three tasks each (SST-5-like 5-way classification, a paraphrase
logit, an STS regression, all on the pooled output), random weights, AdamW:

- ``separate``: each task has its own batch (16 x 32 tokens by default) through
  the shared encoder, as in bert_demo's multitask training.
- ``shared``: one batch through the encoder, three heads on it.

Variants, each with its own model copy and optimizer, timed round-robin:

- ``plain``: ``sum(losses).backward()``, the cost we aim at.
- ``3x autograd.grad``: one ``torch.autograd.grad`` per task, summed into ``.grad``.
- ``flat PCGrad``: the usual flatten-and-loop implementation
  (benchmarks/baselines/flat_pcgrad.py).
- ``torchjd PCGrad``: torchjd 0.18 ``autojac.backward`` + ``jac_to_grad(PCGrad())``
  (``mtl_backward`` on the encoder output in the shared setting, its documented
  way for a shared trunk).
- ``gradtools.PCGrad``: ours, in the device's default storage layout, and in
  the other one (``gradient_buckets``: on by default on CUDA, off on CPU).

Time: median of ``--repeats`` interleaved steps (zero_grad, forward, backward,
optimizer step), and the median over rounds of each variant's time divided by
the plain step's time in the same round. Memory: peak bytes allocated by torch during one step above
what was allocated before it (model, optimizer state and inputs excluded); on
CPU from the profiler's allocation trace ("Total Allocated"), on CUDA from
``torch.cuda.max_memory_allocated``.

Table (the numbers in benchmarks/RESULTS.md):
    .venv/bin/python benchmarks/bench_pcgrad.py [--repeats 5] [--device cpu|cuda]
        [--threads 1] [--settings separate shared] [--batch 16] [--tokens 32]
pytest-benchmark suite (small encoder, statistics per variant):
    .venv/bin/python -m pytest benchmarks/bench_pcgrad.py --benchmark-only
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradtools
from bert_demo.model import BertConfig, BertModel

try:
    from benchmarks.baselines.flat_pcgrad import FlatPCGrad
    from benchmarks.timing import median_ms, time_interleaved
except ImportError:  # run as a script: benchmarks/ is on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.baselines.flat_pcgrad import FlatPCGrad
    from benchmarks.timing import median_ms, time_interleaved


def minilm_config(layers: int = 6) -> BertConfig:
    """MiniLM-L6-H384's shape (all-MiniLM-L6-v2), optionally with fewer layers."""
    return BertConfig(
        hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536
    )


class ThreeTasks(nn.Module):
    """A shared encoder and three heads on its pooled output."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.encoder = BertModel(config)
        hidden = config.hidden_size
        self.heads = nn.ModuleList(
            [nn.Linear(hidden, 5), nn.Linear(hidden, 1), nn.Linear(hidden, 1)]
        )

    def head_losses(self, pooled: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        sst = F.cross_entropy(self.heads[0](pooled[0]), targets[0])
        para = F.binary_cross_entropy_with_logits(self.heads[1](pooled[1]).squeeze(-1), targets[1])
        sts = F.mse_loss(self.heads[2](pooled[2]).squeeze(-1), targets[2])
        return [sst, para, sts]


@dataclass
class Batch:
    ids: Tensor
    mask: Tensor


def make_inputs(
    config: BertConfig, batch: int, tokens: int, device: str, shared: bool
) -> tuple[list[Batch], list[Tensor]]:
    gen = torch.Generator().manual_seed(0)
    count = 1 if shared else 3
    batches = []
    for _ in range(count):
        ids = torch.randint(1, config.vocab_size, (batch, tokens), generator=gen)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[: batch // 2, tokens * 3 // 4 :] = 0  # some padding, as real batches have
        batches.append(Batch(ids.to(device), mask.to(device)))
    targets = [
        torch.randint(0, 5, (batch,), generator=gen).to(device),
        torch.randint(0, 2, (batch,), generator=gen).float().to(device),
        (5 * torch.rand(batch, generator=gen)).to(device),
    ]
    return batches, targets


class Setting:
    """One model copy with its optimizer and a way to compute the three losses."""

    def __init__(self, model: ThreeTasks, batches: list[Batch], targets: list[Tensor]) -> None:
        self.model = model
        self.batches = batches
        self.targets = targets
        self.shared = len(batches) == 1
        self.encoder_params = list(model.encoder.parameters())
        self.params = list(model.parameters())
        self.features: Tensor | None = None

    def losses(self) -> list[Tensor]:
        if self.shared:
            b = self.batches[0]
            pooled = self.model.encoder(b.ids, b.mask).pooler_output
            self.features = pooled
            return self.model.head_losses([pooled] * 3, self.targets)
        pooled = [self.model.encoder(b.ids, b.mask).pooler_output for b in self.batches]
        return self.model.head_losses(pooled, self.targets)


def adamw(params: list[Tensor]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)


def make_variants(base: ThreeTasks, batches: list[Batch], targets: list[Tensor]):
    """name -> (setting, step function, zero_grad function)."""
    variants: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}

    def fresh() -> Setting:
        return Setting(copy.deepcopy(base), batches, targets)

    s_plain = fresh()
    opt_plain = adamw(s_plain.params)

    def plain() -> None:
        opt_plain.zero_grad(set_to_none=True)
        sum(s_plain.losses()).backward()  # type: ignore[union-attr]
        opt_plain.step()

    variants["plain"] = (plain, lambda: opt_plain.zero_grad(set_to_none=True))

    s_grad = fresh()
    opt_grad = adamw(s_grad.params)

    def three_grads() -> None:
        opt_grad.zero_grad(set_to_none=True)
        losses = s_grad.losses()
        total: list[Tensor | None] = [None] * len(s_grad.params)
        for t, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss, s_grad.params, allow_unused=True, retain_graph=t < len(losses) - 1
            )
            for k, g in enumerate(grads):
                if g is not None:
                    total[k] = g if total[k] is None else total[k] + g  # type: ignore[operator]
        for p, g in zip(s_grad.params, total, strict=True):
            p.grad = g
        opt_grad.step()

    variants["3x autograd.grad"] = (three_grads, lambda: opt_grad.zero_grad(set_to_none=True))

    s_flat = fresh()
    opt_flat = FlatPCGrad(adamw(s_flat.params))

    def flat() -> None:
        opt_flat.zero_grad()
        opt_flat.backward(s_flat.losses())
        opt_flat.step()

    variants["flat PCGrad"] = (flat, opt_flat.zero_grad)

    try:
        from torchjd.aggregation import PCGrad as JDPCGrad
        from torchjd.autojac import backward as jd_backward
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:  # the bench extra is not installed
        pass
    else:
        s_jd = fresh()
        opt_jd = adamw(s_jd.params)
        aggregator = JDPCGrad()

        def torchjd_step() -> None:
            opt_jd.zero_grad(set_to_none=True)
            losses = s_jd.losses()
            if s_jd.shared:
                assert s_jd.features is not None
                mtl_backward(losses, features=s_jd.features)
                jac_to_grad(s_jd.encoder_params, aggregator)
            else:
                jd_backward(losses, inputs=s_jd.params)
                jac_to_grad(s_jd.params, aggregator)
            opt_jd.step()

        variants["torchjd PCGrad"] = (torchjd_step, lambda: opt_jd.zero_grad(set_to_none=True))

    s_ours = fresh()
    opt_ours = gradtools.PCGrad(adamw(s_ours.params), generator=torch.Generator().manual_seed(0))

    def ours() -> None:
        opt_ours.zero_grad(set_to_none=True)
        opt_ours.backward(s_ours.losses())
        opt_ours.step()

    variants["gradtools.PCGrad"] = (ours, lambda: opt_ours.zero_grad(set_to_none=True))

    # The other storage layout than the device's default (buckets are the default
    # on CUDA, per-tensor storage on CPU), to show the trade-off.
    on_cuda = next(base.parameters()).device.type == "cuda"
    s_alt = fresh()
    opt_alt = gradtools.PCGrad(
        adamw(s_alt.params),
        generator=torch.Generator().manual_seed(0),
        gradient_buckets=not on_cuda,
    )

    def alternative() -> None:
        opt_alt.zero_grad(set_to_none=True)
        opt_alt.backward(s_alt.losses())
        opt_alt.step()

    label = "gradtools.PCGrad, per-tensor" if on_cuda else "gradtools.PCGrad, buckets"
    variants[label] = (alternative, lambda: opt_alt.zero_grad(set_to_none=True))
    return variants


def peak_step_bytes(step: Callable[[], None], device: str) -> int:
    """Peak bytes torch allocates during one step, above what was allocated before it.

    Call it with every variant's gradients freed, so that nothing allocated
    earlier is released inside the measured step.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    # The CPU allocator reports every allocation and free to the profiler, with a
    # running total that starts at 0 when profiling starts.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    memory = [
        e["args"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0
    ]
    if not memory:
        return 0
    memory.sort(key=lambda a: a["Ev Idx"])
    # The running total counts every block the profiler has ever seen alive, so
    # measure from its value just before the step's first allocation.
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(a["Total Allocated"] for a in memory) - start


def run_setting(
    name: str, config: BertConfig, args: argparse.Namespace, repeats: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    torch.manual_seed(0)
    base = ThreeTasks(config).to(args.device)
    batches, targets = make_inputs(config, args.batch, args.tokens, args.device, name == "shared")
    variants = make_variants(base, batches, targets)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants or k == "plain"}
    times = time_interleaved(
        {k: v[0] for k, v in variants.items()}, repeats=repeats, warmup=1, device=args.device
    )
    memory = {}
    if not args.no_memory:
        for variant, (step, _) in variants.items():
            for _, zero_grad in variants.values():
                zero_grad()
            memory[variant] = peak_step_bytes(step, args.device) / 2**20
    return times, memory


def breakdown(name: str, config: BertConfig, args: argparse.Namespace, steps: int = 3) -> str:
    """Where gradtools.PCGrad's step goes: its profiler ranges, per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    base = ThreeTasks(config).to(args.device)
    batches, targets = make_inputs(config, args.batch, args.tokens, args.device, name == "shared")
    variants = make_variants(base, batches, targets)
    step, _ = variants["gradtools.PCGrad"]
    plain, _ = variants["plain"]
    for _ in range(2):
        step()
        plain()
    activities = [ProfilerActivity.CPU]
    if torch.device(args.device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
    rows = ["| range | CPU ms/step | device ms/step |", "|---|---:|---:|"]
    for event in sorted(prof.key_averages(), key=lambda e: e.key):
        if event.key.startswith(("PCGrad.", "Optimizer.step")):
            device_us = getattr(event, "device_time_total", 0) or 0
            rows.append(
                f"| {event.key} | {event.cpu_time_total / 1e3 / steps:.2f} | "
                f"{device_us / 1e3 / steps:.2f} |"
            )
    return "\n".join(rows)


def table(title: str, times: dict[str, list[float]], memory: dict[str, float]) -> str:
    """Medians, and each variant's time over the plain step's in the same round
    (its median: paired within a round, so that load drifting over the run
    cancels out)."""
    rows = [
        f"| {title} | median ms | / plain (paired) | peak MiB | / plain |",
        "|---|---:|---:|---:|---:|",
    ]
    plain = times["plain"]
    for name, samples in times.items():
        paired = statistics.median(t / p for t, p in zip(samples, plain, strict=True))
        mem = memory.get(name)
        mem_cols = (
            f"{mem:.0f} | {mem / memory['plain']:.2f}x"
            if mem is not None and memory.get("plain")
            else "- | -"
        )
        rows.append(f"| {name} | {median_ms(samples):.1f} | {paired:.2f}x | {mem_cols} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: with more, a shared machine's noise dominates)",
    )
    parser.add_argument("--settings", nargs="*", default=["separate", "shared"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument(
        "--variants", nargs="*", default=None, help="only these variants (plain is always kept)"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also profile where gradtools.PCGrad's time goes"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", UserWarning)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"torch {torch.__version__}, device {args.device} ({device_name}), "
        f"threads {torch.get_num_threads()}, MiniLM shape with {args.layers} layers, "
        f"batch {args.batch} x {args.tokens} tokens, {args.repeats} repeats"
    )
    config = minilm_config(args.layers)
    for name in args.settings:
        times, memory = run_setting(name, config, args, args.repeats)
        title = (
            "three tasks, separate batches"
            if name == "separate"
            else "one shared batch, three heads"
        )
        print()
        print(table(title, times, memory))
        if args.breakdown:
            print()
            print(breakdown(name, config, args))
        sys.stdout.flush()


# ---------------------------------------------------------------------- pytest-benchmark


@pytest.fixture(scope="module")
def small_variants():
    config = minilm_config(layers=2)
    torch.manual_seed(0)
    base = ThreeTasks(config)
    batches, targets = make_inputs(config, 8, 32, "cpu", shared=False)
    return make_variants(base, batches, targets)


@pytest.mark.parametrize(
    "name", ["plain", "3x autograd.grad", "flat PCGrad", "torchjd PCGrad", "gradtools.PCGrad"]
)
def test_pcgrad_step(benchmark, small_variants, name: str) -> None:  # type: ignore[no-untyped-def]
    if name not in small_variants:
        pytest.skip("torchjd is not installed")
    step, _ = small_variants[name]
    benchmark.group = "PCGrad step, 2-layer MiniLM shape, separate batches"
    benchmark(step)


if __name__ == "__main__":
    main()
