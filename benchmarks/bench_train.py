"""One bert_demo training step: fp32 vs bf16 autocast, AdamW paths, 1 vs 2 threads.

The model is bert_demo's MultitaskBert on the packaged MiniLM-L6-H384, built as
the quick preset builds it (dropout 0.1, mean pooling), in training mode. A step
is what ``bert_demo.training.train.Trainer.training_step`` does for one task: embed,
``forward_from_embeddings``, ``task_loss``, backward, optimizer step, on a batch
of 32 x 32 random tokens (a quarter of the rows half padding), SST by default.

Variants (all interleaved round-robin in one run, medians, ratios against the
first row, fp32 + gradtools.AdamW for-loop on one thread, today's demo path):
- precision: fp32, or bf16 autocast on the CPU (forward and loss under
  ``torch.autocast("cpu", torch.bfloat16)``; parameters, gradients and optimizer
  state stay float32);
- optimizer: gradtools.AdamW for-loop, gradtools.AdamW(fused=True), and
  torch.optim.AdamW(fused=True) for reference;
- torch threads: 1 and 2.

Breakdown rows (one thread) price the dense word-embedding table (30522 x 384,
52% of the encoder's parameters): its gradient as autograd builds it (a dense
zero-filled table plus an index_add of the batch's rows) and its AdamW update
with each optimizer. Together they bound what skipping the untouched rows could
save; an exact lazy update would still owe those rows their weight decay and
moment decay in closed form when they are next touched.

Table (the numbers in benchmarks/RESULTS.md):
    .venv/bin/python benchmarks/bench_train.py [--repeats 5] [--tasks sst] [--batch 32] [--tokens 32]
                                               [--threads 1 2] [--precisions fp32 bf16]
pytest-benchmark suite (fp32, one thread, statistics per optimizer):
    .venv/bin/python -m pytest benchmarks/bench_train.py --benchmark-only
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import gradtools
from bert_demo.config import preset_config
from bert_demo.model.multitask import MultitaskBert, task_loss
from bert_demo.training.train import build_model

try:
    from benchmarks.timing import ratio_table, time_interleaved
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from timing import ratio_table, time_interleaved  # type: ignore[no-redef]

OPTIMIZERS: dict[str, Callable[[list[dict[str, object]]], torch.optim.Optimizer]] = {
    "gradtools for-loop": lambda groups: gradtools.AdamW(groups, foreach=False),
    "gradtools fused": lambda groups: gradtools.AdamW(groups, fused=True),
    "torch fused": lambda groups: torch.optim.AdamW(groups, fused=True),
}
BASELINE = "fp32, gradtools for-loop, 1 thread"


@dataclass
class Batch:
    task: str
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here (else they are emulated, slowly)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_batches(tasks: list[str], rows: int, tokens: int, vocab: int, seed: int = 0) -> list[Batch]:
    """Random batches shaped as the demo's: pair tasks stack [first; second] sentences."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for task in tasks:
        sentences = rows if task == "sst" else 2 * rows
        input_ids = torch.randint(1000, vocab, (sentences, tokens), generator=g)
        mask = torch.ones_like(input_ids)
        mask[::4, tokens // 2 :] = 0
        input_ids[mask == 0] = 0
        if task == "sst":
            labels = torch.randint(0, 5, (rows,), generator=g)
        elif task == "para":
            labels = torch.randint(0, 2, (rows,), generator=g).float()
        else:
            labels = 5 * torch.rand(rows, generator=g)
        batches.append(Batch(task, input_ids, mask, labels))
    return batches


def demo_model() -> MultitaskBert:
    torch.manual_seed(0)
    model = build_model(preset_config("quick"))
    model.train()
    return model


def param_groups(model: MultitaskBert) -> list[dict[str, object]]:
    """The quick preset's groups: encoder at lr, heads at head_lr, weight decay 0.01."""
    config = preset_config("quick")
    return [
        {"params": list(model.encoder.parameters()), "lr": config.lr},
        {"params": model.head_parameters(), "lr": config.head_lr},
    ]


def training_step(
    model: MultitaskBert,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    bf16: bool,
    threads: int,
) -> Callable[[], None]:
    def step() -> None:
        torch.set_num_threads(threads)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for batch in batches:
            context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
            with context:
                embeds = model.embed(batch.input_ids)
                output = model.forward_from_embeddings(batch.task, embeds, batch.attention_mask)
                losses.append(task_loss(batch.task, output, batch.labels))
        torch.stack(losses).sum().backward()
        optimizer.step()

    return step


def word_embedding_gradient(batches: list[Batch], table: nn.Embedding) -> Callable[[], None]:
    """The word-embedding table's gradient as autograd computes it: dense, from scratch."""
    grads_out = [
        torch.randn(*b.input_ids.shape, table.embedding_dim) for b in batches
    ]

    def build() -> None:
        torch.set_num_threads(1)
        for b, grad_out in zip(batches, grads_out, strict=True):
            torch.ops.aten.embedding_dense_backward(
                grad_out, b.input_ids, table.num_embeddings, table.padding_idx or -1, False
            )

    return build


def word_embedding_update(name: str, table: nn.Embedding) -> Callable[[], None]:
    """One AdamW step on a copy of the word-embedding table alone, dense gradient."""
    weight = nn.Parameter(table.weight.detach().clone())
    weight.grad = torch.randn_like(weight) * 1e-3
    optimizer = OPTIMIZERS[name]([{"params": [weight], "lr": 1e-4, "weight_decay": 0.01}])

    def update() -> None:
        torch.set_num_threads(1)
        optimizer.step()

    return update


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["sst"], choices=["sst", "para", "sts"])
    parser.add_argument("--batch", type=int, default=32, help="rows (pairs for para/sts)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "bf16"],
        default=None,
        help="default: fp32, plus bf16 where the CPU has native bf16 (avx512_bf16/amx)",
    )
    args = parser.parse_args()
    precisions = args.precisions or ["fp32", *(["bf16"] if cpu_has_native_bf16() else [])]
    if "bf16" not in precisions:
        print(
            f"bf16 autocast left out: this CPU ({torch.backends.cpu.get_cpu_capability()}) has "
            "no native bf16, where a bf16 matmul is emulated and far slower than fp32 "
            "(pass --precisions fp32 bf16 to time it anyway)"
        )
    warnings.simplefilter("error", RuntimeWarning)  # a silent fused fallback would mislabel a row

    steps: dict[str, Callable[[], None]] = {}
    vocab = 0
    table: nn.Embedding | None = None
    batches: list[Batch] = []
    # One model per optimizer (each has its own state); precision and threads are
    # per-call settings, so the variants of one optimizer share its model.
    for name, make in OPTIMIZERS.items():
        model = demo_model()
        table = model.encoder.embeddings.word_embeddings
        vocab = table.num_embeddings
        batches = make_batches(args.tasks, args.batch, args.tokens, vocab)
        optimizer = make(param_groups(model))
        for threads in args.threads:
            for precision in precisions:
                bf16 = precision == "bf16"
                shown = "bf16 autocast" if bf16 else precision
                label = f"{shown}, {name}, {threads} thread{'s' if threads > 1 else ''}"
                steps[label] = training_step(model, optimizer, batches, bf16, threads)
    ordered: dict[str, Callable[[], object]] = {BASELINE: steps.pop(BASELINE), **steps}
    assert table is not None
    ordered["breakdown: word-embedding dense gradient"] = word_embedding_gradient(batches, table)
    for name in OPTIMIZERS:
        ordered[f"breakdown: word-embedding update, {name}"] = word_embedding_update(name, table)

    touched = sorted({int(i) for b in batches for i in b.input_ids.unique()})
    print(
        f"torch {torch.__version__}, tasks {' '.join(args.tasks)}, batch {args.batch} x "
        f"{args.tokens}, {args.repeats} rounds after {args.warmup} warm-up; the batch "
        f"touches {len(touched)} of {vocab} word-embedding rows ({len(touched) / vocab:.1%})"
    )
    times = time_interleaved(ordered, repeats=args.repeats, warmup=args.warmup)
    print()
    print(ratio_table("one demo training step", times, [BASELINE]))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_step(benchmark: pytest.FixtureRequest, name: str) -> None:
    model = demo_model()
    batches = make_batches(["sst"], 32, 32, model.encoder.embeddings.word_embeddings.num_embeddings)
    step = training_step(model, OPTIMIZERS[name](param_groups(model)), batches, False, 1)
    step()  # compile / allocate state outside the timing
    benchmark.group = "bert_demo training step, fp32, 1 thread"  # type: ignore[attr-defined]
    benchmark(step)  # type: ignore[operator]


if __name__ == "__main__":
    main()
