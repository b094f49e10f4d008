"""Shared by the Hugging Face and Lightning examples: two toy text tasks and a two-head model.

The recipes are about the wiring, so the data is made up and learnable in a few
dozen steps: token ids drawn at random, where ids below ``vocab_size // 2``
count as "positive" words.

- task "sentiment" (3 classes): more positive words, as many, or fewer;
- task "score" (regression): the share of positive words, times 5.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FIRST_WORD_ID = 4  # ids 0..3 stand for [PAD], [UNK], [CLS], [SEP]


def toy_batch(batch_size: int, seq_len: int, vocab_size: int,
              generator: torch.Generator) -> dict[str, Tensor]:
    """input_ids, attention_mask (right padding) and the labels of both tasks."""
    ids = torch.randint(FIRST_WORD_ID, vocab_size, (batch_size, seq_len), generator=generator)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=generator)
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    ids = ids * mask  # padding is id 0
    positive = ((ids < vocab_size // 2) & (ids >= FIRST_WORD_ID) & (mask == 1)).sum(-1).float()
    share = positive / lengths.float()
    sentiment = torch.where(share > 0.55, 2, torch.where(share < 0.45, 0, 1))
    return {"input_ids": ids, "attention_mask": mask, "sentiment": sentiment, "score": 5 * share}


class ToyDataset(torch.utils.data.Dataset):
    """``size`` toy rows as a map-style dataset, for the Trainer and Lightning recipes."""

    def __init__(self, size: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.rows = toy_batch(size, seq_len, vocab_size, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.rows["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {key: value[i] for key, value in self.rows.items()}


def tiny_bert(vocab_size: int = 64, hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    """A randomly initialised transformers BertModel (nothing is downloaded)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64)
    return BertModel(config)


class TwoHeadEncoder(nn.Module):
    """Any Hugging Face encoder, mean-pooled, with a sentiment head and a score head."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.sentiment = nn.Linear(hidden, 3)
        self.score = nn.Linear(hidden, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Any) -> tuple[Tensor, Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        return self.sentiment(pooled), self.score(pooled).squeeze(-1)

    def embedding_module(self) -> nn.Module:
        """What SMART perturbs: BERT's whole embedding block (word + position + type,
        LayerNorm) when the encoder has one, else its word embeddings."""
        block = getattr(self.encoder, "embeddings", None)
        return block if isinstance(block, nn.Module) else self.encoder.get_input_embeddings()


def task_losses(outputs: tuple[Tensor, Tensor], batch: dict[str, Tensor]) -> list[Tensor]:
    logits, score = outputs
    return [F.cross_entropy(logits, batch["sentiment"]), F.mse_loss(score, batch["score"])]


KINDS = ("kl", "mse")  # SMART's divergence per output: softmax classes, regression
