"""bert_demo's minBERT against transformers' BertModel, side by side in one run.

Both models load the packaged MiniLM-L6-H384 checkpoint (6 layers, hidden 384,
12 heads, vocab 30522) and run in training mode (dropout 0.1) on a batch of
16 x 32 tokens with padding (a quarter of the rows half empty). One training
step is forward, a 5-class linear head on the pooled output, cross-entropy,
backward and a ``torch.optim.AdamW`` step. The inference row is one forward
pass under ``torch.no_grad`` in eval mode.

Table (the numbers in benchmarks/RESULTS.md):
    .venv/bin/python benchmarks/bench_model.py [--repeats 15] [--threads N] [--device cpu|cuda]
                                               [--model FOLDER]
pytest-benchmark suite (statistics per variant):
    .venv/bin/python -m pytest benchmarks/bench_model.py --benchmark-only
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bert_demo.model import load_pretrained, resolve_model_path

try:
    from benchmarks.timing import ratio_table, time_interleaved
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from timing import ratio_table, time_interleaved  # type: ignore[no-redef]

BATCH, TOKENS, CLASSES = 16, 32, 5


def make_batch(device: torch.device | str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 30000, (BATCH, TOKENS), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::4, TOKENS // 2 :] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def ours_encoder(device: torch.device | str, model: str | None = None) -> nn.Module:
    return load_pretrained(model).to(device)


def hf_encoder(device: torch.device | str, model: str | None = None) -> nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(str(resolve_model_path(model))).to(device)


def pooled(encoder: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Both return an object with .pooler_output; keyword arguments suit both signatures.
    return encoder(input_ids=input_ids, attention_mask=mask).pooler_output


def train_step(encoder: nn.Module, device: torch.device | str) -> Callable[[], None]:
    """A closure running one whole training step of encoder + a fresh linear head."""
    torch.manual_seed(0)
    head = nn.Linear(encoder.config.hidden_size, CLASSES).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    input_ids, mask, labels = make_batch(device)
    encoder.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(pooled(encoder, input_ids, mask)), labels)
        loss.backward()
        optimizer.step()

    return step


def inference(encoder: nn.Module, device: torch.device | str) -> Callable[[], None]:
    input_ids, mask, _ = make_batch(device)
    encoder.eval()

    def forward() -> None:
        with torch.no_grad():
            pooled(encoder, input_ids, mask)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="model folder (default: packaged MiniLM)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    encoders = {
        "transformers": hf_encoder(device, args.model),
        "ours": ours_encoder(device, args.model),
    }
    print(
        f"{args.model or 'MiniLM-L6-H384'}, batch {BATCH} x {TOKENS}, {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {args.repeats} interleaved runs\n"
    )
    steps = {name: train_step(enc, device) for name, enc in encoders.items()}
    times = time_interleaved(steps, repeats=args.repeats, warmup=3, device=device)
    print(ratio_table("training step", times, ["transformers"]) + "\n")
    forwards = {name: inference(enc, device) for name, enc in encoders.items()}
    times = time_interleaved(forwards, repeats=args.repeats, warmup=3, device=device)
    print(ratio_table("inference forward", times, ["transformers"]))


# --------------------------------------------------------------------------- pytest-benchmark


@pytest.fixture(scope="module", params=["transformers", "ours"])
def encoder(request: pytest.FixtureRequest) -> nn.Module:
    pytest.importorskip("transformers")
    return hf_encoder("cpu") if request.param == "transformers" else ours_encoder("cpu")


def test_training_step(benchmark, encoder: nn.Module) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = "minBERT training step"
    benchmark(train_step(encoder, "cpu"))


def test_inference_forward(benchmark, encoder: nn.Module) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = "minBERT inference forward"
    benchmark(inference(encoder, "cpu"))


if __name__ == "__main__":
    main()
