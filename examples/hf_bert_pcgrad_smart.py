"""Fine-tune a Hugging Face BertModel on two tasks with PCGrad, SMART and its momentum teacher.

    python examples/hf_bert_pcgrad_smart.py                          # tiny random BERT, 200 steps
    python examples/hf_bert_pcgrad_smart.py --model bert-base-uncased # a checkpoint already on disk
    python examples/hf_bert_pcgrad_smart.py --steps 30               # what the test suite runs

SMART needs the embeddings and a forward pass that starts from them;
gradtools.EmbeddingTap gets both from the model's ordinary forward, so the
model code is not touched. `--model` loads with local_files_only=True: this
script never downloads (fetch a checkpoint once with `hf download NAME`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import gradtools

from toy_tasks import KINDS, TwoHeadEncoder, task_losses, tiny_bert, toy_batch


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder or cached hub id (default: tiny random BERT)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.model is None:
        encoder = tiny_bert(seed=args.seed)
    else:
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(args.model, local_files_only=True)
    vocab_size = encoder.get_input_embeddings().num_embeddings
    model = TwoHeadEncoder(encoder).train()

    optimizer = gradtools.PCGrad(gradtools.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01),
                                 generator=torch.Generator().manual_seed(args.seed))
    smart = gradtools.SMART(epsilon=1e-4, noise_std=1e-4, step_size=1e-2, steps=1)
    teacher = gradtools.MomentumTeacher(model, total_steps=args.steps)
    tap = gradtools.EmbeddingTap(model.embedding_module())
    lambda_s, mu = 5.0, 1.0
    data = torch.Generator().manual_seed(args.seed + 1)

    window: list[float] = []
    for step in range(1, args.steps + 1):
        batch = toy_batch(args.batch_size, args.seq_len, vocab_size, data)
        ids, mask = batch["input_ids"], batch["attention_mask"]

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            return model(ids, mask)

        embeds, outputs = tap.capture(run)          # the training forward; embeds is in its graph
        losses = task_losses(outputs, batch)
        r_s = smart(tap.forward_with(run), embeds, outputs, kind=KINDS, mask=mask, per_output=True)
        bregman = teacher.bregman(lambda m: m(ids, mask), outputs, kind=KINDS, per_output=True)
        total = [losses[i] + lambda_s * r_s[i] + mu * bregman[i] for i in range(2)]

        optimizer.zero_grad()
        optimizer.backward(total)
        optimizer.step()
        teacher.update(model)

        window.append(sum(loss.item() for loss in losses))
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {sum(window) / len(window):.4f}  "
                  f"r_s {smart.stats.r_s.item():.2e}  |delta|max {smart.stats.delta_norm_max.item():.1e}  "
                  f"bregman {teacher.stats.bregman.item():.2e}", flush=True)
            window.clear()


if __name__ == "__main__":
    main()
