"""One head per task on one shared minBERT encoder.

The tasks (their outputs, losses and predictions) are described in
:mod:`bert_demo.tasks`. A single-sentence task gets dropout + linear over the
sentence vector; a pair task combines the two sentences' vectors (or reads the
joint sequence when cross-encoded).

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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bert_demo.model import BertModel
from bert_demo.tasks import PAPER_TASKS, TASKS, Task, get_task

Pooling = Literal["mean", "cls"]
PairEncoding = Literal["separate", "cross"]
PairHeadKind = Literal["cosine", "features"]


@dataclass(frozen=True)
class HeadSettings:
    """How the heads read the encoder; saved with every checkpoint to rebuild the model.

    These defaults are also :class:`bert_demo.config.TrainConfig`'s.
    """

    pooling: Pooling = "cls"  # BERT's tanh pooler at [CLS], or the masked mean of the last layer
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

    def pair_head(self, task: str) -> PairHeadKind:
        """The separate-mode head of a pair task (features for a task with no setting)."""
        kinds: dict[str, PairHeadKind] = {"para": self.para_head, "sts": self.sts_head}
        return kinds.get(task, "features")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


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


def _head(task: Task, settings: HeadSettings, hidden: int) -> nn.Module:
    dropout = settings.head_dropout
    if not task.pairs:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, task.num_outputs))
    if settings.pair_encoding == "cross":
        return CrossHead(hidden, dropout, bias=task.cross_bias)
    if settings.pair_head(task.name) == "features":
        return FeatureHead(hidden, dropout)
    # The initial scale/shift put an untrained cosine in the label's range.
    return CosineHead(*task.cosine_init)


class MultitaskBert(nn.Module):
    """A shared :class:`BertModel` encoder with one head per task (``heads[task]``)."""

    def __init__(
        self,
        encoder: BertModel,
        settings: HeadSettings | None = None,
        tasks: Sequence[str] = PAPER_TASKS,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.settings = settings or HeadSettings()
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict(
            {name: _head(get_task(name), self.settings, hidden) for name in tasks}
        )
        self.register_load_state_dict_pre_hook(_rename_old_head_keys)

    @property
    def separate_pairs(self) -> bool:
        return self.settings.pair_encoding == "separate"

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the heads only (what the frozen-encoder mode trains)."""
        return list(self.heads.parameters())

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

        Class logits [B, num_outputs], or one logit or score per example [B].
        In separate mode ``embeds`` holds 2B rows (first sentences, then second ones).
        """
        return self.forward_with_vectors(task, embeds, attention_mask)[0]

    def forward_with_vectors(
        self, task: str, embeds: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward_from_embeddings`'s output and the sentence vectors the head read
        ([2B, H] in separate pair mode: first sentences, then second ones)."""
        head = self._head_of(task)
        vectors = self.sentence_vectors(embeds, attention_mask)
        if not TASKS[task].pairs:
            return head(vectors), vectors
        if self.separate_pairs:
            if vectors.shape[0] % 2:
                raise ValueError(
                    f"a separate-encoded {task} batch stacks [first; second] sentences and "
                    f"needs an even number of rows, got {vectors.shape[0]}"
                )
            u, v = vectors.chunk(2)
            return head(u, v), vectors
        return head(vectors), vectors

    def _head_of(self, task: str) -> nn.Module:
        if task not in self.heads:
            get_task(task)  # an unknown task gets the list of tasks
            raise ValueError(f"this model has no {task!r} head (tasks: {tuple(self.heads)})")
        return self.heads[task]

    def forward(
        self,
        task: str,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        embeds = self.embed(input_ids, token_type_ids)
        return self.forward_from_embeddings(task, embeds, attention_mask)


def _rename_old_head_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Checkpoints before the task table kept ``sst_head.*`` and ``pair_heads.<task>.*``."""
    for key in list(state_dict):
        rest = key[len(prefix):]
        if rest.startswith("sst_head."):
            state_dict[prefix + "heads.sst." + rest[len("sst_head."):]] = state_dict.pop(key)
        elif rest.startswith("pair_heads."):
            state_dict[prefix + "heads." + rest[len("pair_heads."):]] = state_dict.pop(key)


def task_loss(task: str, output: Tensor, labels: Tensor) -> Tensor:
    """The task's training loss (see :class:`bert_demo.tasks.Task`)."""
    return get_task(task).loss(output, labels)


def predictions(task: str, output: Tensor) -> Tensor:
    """Model output -> predicted labels (see :class:`bert_demo.tasks.Task`)."""
    return get_task(task).predict(output)
