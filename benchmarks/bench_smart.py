"""SMART step time against a plain fine-tuning step, and against smart-pytorch, side by side.

Model: bert_demo's minBERT in the MiniLM-L6-H384 shape (6 layers, hidden 384,
12 heads, intermediate 1536, vocab 30522; random weights, dropout 0.1, training
mode) with a 5-class head on the pooled output; batch 16 x 32 tokens with some
padding; torch.optim.AdamW. Every variant is one whole training step: forward,
loss, backward, optimizer step (and teacher update where there is a teacher).

    plain                     cross-entropy only
    gradtools K=1             + 5 * R_s (gradtools.SMART, steps=1, inf-token ball)
    gradtools K=1 + teacher   + 5 * R_s + 1 * D_Breg (gradtools.MomentumTeacher)
    gradtools K=2             + 5 * R_s with two ascent steps
    gradtools K=1, dropout off  the extra passes in eval mode (no dropout masks drawn)
    smart-pytorch K=1 / K=2   + 5 * SMARTLoss(num_steps=K), sym-KL last loss (no projection, no teacher)

Table (the numbers in benchmarks/RESULTS.md):
    .venv/bin/python benchmarks/bench_smart.py [--repeats 9] [--device cpu|cuda] [--threads N]
pytest-benchmark suite (statistics per variant):
    .venv/bin/python -m pytest benchmarks/bench_smart.py --benchmark-only
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradtools
from bert_demo.model import BertConfig, BertModel

try:
    from benchmarks.timing import ratio_table, time_interleaved
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from timing import ratio_table, time_interleaved  # type: ignore[no-redef]

BATCH, TOKENS, CLASSES = 16, 32, 5
LAMBDA_S, MU = 5.0, 1.0


def minilm_config() -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
    )


class Classifier(nn.Module):
    """Encoder + linear head on the pooled output, with the embeddings exposed for SMART."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.bert = BertModel(config)
        self.head = nn.Linear(config.hidden_size, CLASSES)

    def from_embeddings(self, embeds: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.bert.encode(embeds, mask).pooler_output)

    def forward(self, ids: Tensor, types: Tensor, mask: Tensor) -> Tensor:
        return self.from_embeddings(self.bert.embed(ids, types), mask)


class Setup:
    """One model, optimizer and batch shared by all variants, so they differ only in the loss."""

    def __init__(self, device: str, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = Classifier(minilm_config()).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 30522, (BATCH, TOKENS), generator=gen).to(self.device)
        self.types = torch.zeros_like(self.ids)
        lengths = torch.randint(TOKENS // 2, TOKENS + 1, (BATCH,), generator=gen)
        self.mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).long().to(self.device)
        self.labels = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(self.device)

    def step(self, extra: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        """One training step; ``extra(embeds, logits)`` adds the regularizer terms."""
        embeds = self.model.bert.embed(self.ids, self.types)
        logits = self.model.from_embeddings(embeds, self.mask)
        loss = F.cross_entropy(logits, self.labels)
        if extra is not None:
            loss = loss + extra(embeds, logits)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def perturbed_forward(self, embeds: Tensor) -> Tensor:
        return self.model.from_embeddings(embeds, self.mask)


def variants(setup: Setup) -> dict[str, Callable[[], object]]:
    """The compared training steps, keyed by name."""
    smart1 = gradtools.SMART(steps=1)
    smart2 = gradtools.SMART(steps=2)
    teacher = gradtools.MomentumTeacher(setup.model, total_steps=1000)

    def ours(smart: gradtools.SMART) -> Callable[[Tensor, Tensor], Tensor]:
        def extra(embeds: Tensor, logits: Tensor) -> Tensor:
            return LAMBDA_S * smart(setup.perturbed_forward, embeds, logits, mask=setup.mask)

        return extra

    def ours_with_teacher(embeds: Tensor, logits: Tensor) -> Tensor:
        r_s = smart1(setup.perturbed_forward, embeds, logits, mask=setup.mask)
        prox = teacher.bregman(lambda m: m(setup.ids, setup.types, setup.mask), logits)
        return LAMBDA_S * r_s + MU * prox

    def teacher_step() -> None:
        setup.step(ours_with_teacher)
        teacher.update(setup.model)

    smart1_off = gradtools.SMART(steps=1, dropout="off")

    def ours_dropout_off(embeds: Tensor, logits: Tensor) -> Tensor:
        r_s = smart1_off(
            setup.perturbed_forward, embeds, logits, mask=setup.mask, module=setup.model
        )
        return LAMBDA_S * r_s

    table: dict[str, Callable[[], object]] = {
        "plain": lambda: setup.step(),
        "gradtools K=1": lambda: setup.step(ours(smart1)),
        "gradtools K=1 + teacher": teacher_step,
        "gradtools K=2": lambda: setup.step(ours(smart2)),
        "gradtools K=1, dropout off": lambda: setup.step(ours_dropout_off),
    }
    try:
        from smart_pytorch import SMARTLoss
        from smart_pytorch.loss import kl_loss, sym_kl_loss
    except ImportError:  # the bench extra is not installed
        return table

    def theirs(steps: int) -> Callable[[Tensor, Tensor], Tensor]:
        loss = SMARTLoss(
            eval_fn=setup.perturbed_forward,
            loss_fn=kl_loss,
            loss_last_fn=sym_kl_loss,
            num_steps=steps,
        )

        def extra(embeds: Tensor, logits: Tensor) -> Tensor:
            return LAMBDA_S * loss(embeds, logits)

        return extra

    table["smart-pytorch K=1"] = lambda: setup.step(theirs(1))
    table["smart-pytorch K=2"] = lambda: setup.step(theirs(2))
    return table


# ---------------------------------------------------------------------------- pytest-benchmark

VARIANT_NAMES = [
    "plain",
    "gradtools K=1",
    "gradtools K=1 + teacher",
    "gradtools K=2",
    "gradtools K=1, dropout off",
    "smart-pytorch K=1",
    "smart-pytorch K=2",
]


@pytest.fixture(scope="module")
def bench_variants() -> dict[str, Callable[[], object]]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return variants(Setup("cpu"))


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_smart_step(
    benchmark: Any, bench_variants: dict[str, Callable[[], object]], name: str
) -> None:
    if name not in bench_variants:
        pytest.skip("smart-pytorch is not installed")
    benchmark.pedantic(bench_variants[name], rounds=5, warmup_rounds=1)


# ---------------------------------------------------------------------------- script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(args.device)
    times = time_interleaved(variants(setup), args.repeats, args.warmup, setup.device)
    device = torch.cuda.get_device_name() if setup.device.type == "cuda" else "cpu"
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"MiniLM-L6-H384 minBERT, batch {BATCH} x {TOKENS}, {args.repeats} interleaved repeats\n")
    print(ratio_table("SMART step", times, ["plain", "smart-pytorch K=1"]))


if __name__ == "__main__":
    main()
