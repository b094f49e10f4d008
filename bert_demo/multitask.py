"""Three task heads on one shared minBERT encoder.

Tasks (names used everywhere in bert_demo):

    sst   SST-5 sentiment: dropout + linear over the sentence vector -> 5 logits, cross-entropy
    para  Quora paraphrase: the two questions combined -> one logit, binary cross-entropy
    sts   STS-B similarity: the two sentences combined -> one score on 0..5, squared error

Pairs are encoded either *separately* (the paper's choice, Sentence-BERT style: each
sentence runs through the encoder alone and a head combines the two vectors) or
*cross*-encoded as one sequence ``[CLS] s1 [SEP] s2 [SEP]``. In separate mode a pair
batch stacks the first sentences over the second ones, ``[s1_1..s1_B, s2_1..s2_B]``,
so a pair batch is a single tensor like a sentence batch; this lets SMART perturb
one embedding tensor for every task.

The forward pass splits at the embeddings, as SMART needs::

    embeds = model.embed(batch)                                   # what the encoder consumes
    out = model.forward_from_embeddings(task, embeds, batch.attention_mask)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bert_demo.model import BertModel

TASKS: tuple[str, ...] = ("sst", "para", "sts")
NUM_SENTIMENT_CLASSES = 5
STS_MAX = 5.0

Pooling = Literal["mean", "cls"]
PairEncoding = Literal["separate", "cross"]
PairHeadKind = Literal["cosine", "features"]


@dataclass(frozen=True)
class HeadSettings:
    """How the heads read the encoder; saved with every checkpoint to rebuild the model."""

    pooling: Pooling = "mean"  # masked mean of the last layer, or BERT's tanh pooler at [CLS]
    pair_encoding: PairEncoding = "separate"
    para_head: PairHeadKind = "features"  # separate mode only
    sts_head: PairHeadKind = "cosine"  # separate mode only
    head_dropout: float = 0.3

    def __post_init__(self) -> None:
        _check_choice("pooling", self.pooling, ("mean", "cls"))
        _check_choice("pair_encoding", self.pair_encoding, ("separate", "cross"))
        _check_choice("para_head", self.para_head, ("cosine", "features"))
        _check_choice("sts_head", self.sts_head, ("cosine", "features"))
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average of the real (unpadded) token vectors: [B, T, H], [B, T] -> [B, H]."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    # clamp: a row of pure padding gives a zero vector, not 0/0.
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class CosineHead(nn.Module):
    """score = scale * cos(u, v) + shift: one logit from two sentence vectors.

    Starts from the pretrained encoder's own notion of similarity (a sentence-embedding
    model like MiniLM already ranks pairs well by cosine); only two numbers are learned.
    """

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.shift = nn.Parameter(torch.tensor(float(shift)))

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return self.scale * F.cosine_similarity(u, v, dim=-1) + self.shift


class FeatureHead(nn.Module):
    """logit = linear(dropout([u, v, |u - v|, u * v])), as in Sentence-BERT's classifier."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(4 * hidden, 1)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        features = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
        return self.linear(self.dropout(features)).squeeze(-1)


class CrossHead(nn.Module):
    """logit = linear(dropout(vector of the joint sequence [CLS] s1 [SEP] s2 [SEP]))."""

    def __init__(self, hidden: int, dropout: float, bias: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden, 1)
        nn.init.constant_(self.linear.bias, bias)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.linear(self.dropout(pooled)).squeeze(-1)


def _pair_head(kind: PairHeadKind, task: str, hidden: int, dropout: float) -> nn.Module:
    if kind == "features":
        return FeatureHead(hidden, dropout)
    # Initial scale/shift put an untrained cosine in the label's range: STS scores
    # 0..5 from cosines that mostly lie in 0..1; Quora's logit crosses 0 near cos 0.7.
    if task == "sts":
        return CosineHead(scale=STS_MAX, shift=0.0)
    return CosineHead(scale=10.0, shift=-7.0)


class MultitaskBert(nn.Module):
    """A shared :class:`BertModel` encoder with the sst, para and sts heads."""

    def __init__(self, encoder: BertModel, settings: HeadSettings | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.settings = settings or HeadSettings()
        hidden = encoder.config.hidden_size
        dropout = self.settings.head_dropout
        self.sst_head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(hidden, NUM_SENTIMENT_CLASSES)
        )
        self.pair_heads = nn.ModuleDict()
        for task in ("para", "sts"):
            if self.settings.pair_encoding == "cross":
                bias = STS_MAX / 2 if task == "sts" else 0.0
                self.pair_heads[task] = CrossHead(hidden, dropout, bias=bias)
            else:
                kind = self.settings.para_head if task == "para" else self.settings.sts_head
                self.pair_heads[task] = _pair_head(kind, task, hidden, dropout)

    @property
    def separate_pairs(self) -> bool:
        return self.settings.pair_encoding == "separate"

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the heads only (what `--mode pretrain` trains)."""
        return [*self.sst_head.parameters(), *self.pair_heads.parameters()]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The head parameters that belong to one task alone."""
        check_task(task)
        if task == "sst":
            return list(self.sst_head.parameters())
        return list(self.pair_heads[task].parameters())

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Token ids -> the encoder's input embeddings [N, T, H] (where SMART perturbs)."""
        return self.encoder.embed(input_ids, token_type_ids)

    def sentence_vectors(self, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.encoder.encode(embeds, attention_mask)
        if self.settings.pooling == "cls":
            return out.pooler_output
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward_from_embeddings(self, task: str, embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Task output from input embeddings.

        sst: logits [B, 5]. para: one logit per pair [B]. sts: predicted score [B].
        In separate mode ``embeds`` holds 2B rows (first sentences, then second ones).
        """
        check_task(task)
        vectors = self.sentence_vectors(embeds, attention_mask)
        if task == "sst":
            return self.sst_head(vectors)
        head = self.pair_heads[task]
        if self.separate_pairs:
            if vectors.shape[0] % 2:
                raise ValueError(
                    f"a separate-encoded {task} batch stacks [first; second] sentences and "
                    f"needs an even number of rows, got {vectors.shape[0]}"
                )
            u, v = vectors.chunk(2)
            return head(u, v)
        return head(vectors)

    def forward(
        self,
        task: str,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        embeds = self.embed(input_ids, token_type_ids)
        return self.forward_from_embeddings(task, embeds, attention_mask)


def task_loss(task: str, output: Tensor, labels: Tensor) -> Tensor:
    """The paper's losses: cross-entropy (sst), BCE on a logit (para), squared error (sts)."""
    check_task(task)
    if task == "sst":
        return F.cross_entropy(output, labels.long())
    # A [B] prediction against [B, 1] labels would broadcast to [B, B]: refuse it.
    if output.shape != labels.shape:
        raise ValueError(
            f"{task} output shape {tuple(output.shape)} != labels shape {tuple(labels.shape)}"
        )
    if task == "para":
        return F.binary_cross_entropy_with_logits(output, labels.to(output.dtype))
    return F.mse_loss(output, labels.to(output.dtype))


def predictions(task: str, output: Tensor) -> Tensor:
    """Model output -> predicted labels: class (sst), 0/1 (para), score clipped to 0..5 (sts)."""
    check_task(task)
    if task == "sst":
        return output.argmax(-1)
    if task == "para":
        return (output > 0).long()
    return output.clamp(0.0, STS_MAX)
