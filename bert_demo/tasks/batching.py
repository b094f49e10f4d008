"""Examples -> tensors for one task, and the deterministic order batches are drawn in.

The order of training batches is a pure function of (seed, task, global step): the
examples of a task are walked in a random permutation per pass ("cycle"), and a
task with fewer batches than the epoch simply starts its next cycle. A resumed run
therefore needs only the step counter to continue with exactly the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bert_demo.model.tokenizer import WordPieceTokenizer
from bert_demo.tasks import TASKS, get_task
from bert_demo.tasks.data import Example, PairExample, SentenceExample, reverse_pairs

__all__ = ["Example", "TaskBatch", "batch_indices", "batches_per_pass", "eval_batches",
           "example_length", "make_batch"]


@dataclass
class TaskBatch:
    """One task's batch. In separate pair mode rows are [first sentences; second ones]."""

    task: str
    ids: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    labels: Tensor | None  # [B]; None for unlabeled files

    @property
    def size(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(
            self.task,
            self.ids,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.token_type_ids.to(device),
            None if self.labels is None else self.labels.to(device),
        )


def make_batch(
    task: str,
    examples: Sequence[Example],
    tokenizer: WordPieceTokenizer,
    max_length: int,
    separate_pairs: bool = True,
    sts_aug: bool = False,
) -> TaskBatch:
    """Tokenize examples of one task into a :class:`TaskBatch`.

    ``sts_aug`` appends each STS pair reversed (s2, s1), doubling the batch as the
    paper's stsAug does; it only applies to training batches of the sts task.
    """
    spec = get_task(task)
    if not examples:
        raise ValueError(f"empty {task} batch")
    items = list(examples)
    if not spec.pairs:
        if not all(isinstance(e, SentenceExample) for e in items):
            raise TypeError(f"{task} batches take SentenceExample rows")
        encoded = tokenizer.encode([e.sentence for e in items], max_length=max_length)  # type: ignore[union-attr]
    else:
        if not all(isinstance(e, PairExample) for e in items):
            raise TypeError(f"{task} batches take PairExample rows")
        pairs: list[PairExample] = items  # type: ignore[assignment]
        if sts_aug and task == "sts":
            pairs = reverse_pairs(pairs)  # the pairs, then each one swapped
        items = list(pairs)
        first = [p.sentence1 for p in pairs]
        second = [p.sentence2 for p in pairs]
        if separate_pairs:
            # One padded tensor for both sides: the model splits it in halves.
            encoded = tokenizer.encode(first + second, max_length=max_length)
        else:
            encoded = tokenizer.encode(first, second, max_length=max_length)
    labels: Tensor | None = None
    raw = [e.label for e in items]
    if all(label is not None for label in raw):
        labels = torch.tensor(raw, dtype=spec.label_dtype)
    return TaskBatch(
        task,
        [e.id for e in items],
        encoded.input_ids,
        encoded.attention_mask,
        encoded.token_type_ids,
        labels,
    )


def batches_per_pass(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def example_length(example: Example) -> int:
    """A cheap length proxy (characters; the longer side of a pair) for bucketing."""
    if isinstance(example, SentenceExample):
        return len(example.sentence)
    return max(len(example.sentence1), len(example.sentence2))


def _generator(seed: int, task: str, *parts: int) -> torch.Generator:
    # The task's position in the table (sst 0, para 1, sts 2) keeps every task's stream apart.
    value = seed * 1_000_003 + list(TASKS).index(task) * 10_007
    for part in parts:
        value = value * 7_919 + part
    return torch.Generator().manual_seed(value % (2**63))


def batch_indices(
    lengths: Sequence[int], batch_size: int, step: int, seed: int, task: str, buckets: int = 1
) -> list[int]:
    """Example indices of ``task``'s batch at global training step ``step``.

    Pass ``c`` over the data walks a permutation seeded by (seed, task, c). With
    ``buckets > 1`` the permutation is cut into windows of ``buckets`` batches;
    each window is sorted by length before it is cut into batches, and those
    batches come in a random order: batches stay random but pad far less. The
    answer depends on nothing but the arguments, so a resumed run needs only
    the step.
    """
    num_examples = len(lengths)
    per_pass = batches_per_pass(num_examples, batch_size)
    cycle, position = divmod(step, per_pass)
    order = torch.randperm(num_examples, generator=_generator(seed, task, cycle)).tolist()
    if buckets <= 1:
        return order[position * batch_size : (position + 1) * batch_size]
    window_size = buckets * batch_size
    window, within = divmod(position, buckets)
    chunk = sorted(order[window * window_size : (window + 1) * window_size], key=lambda i: lengths[i])
    batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=_generator(seed, task, cycle, window + 1))
    return batches[int(shuffle[within])]


def eval_batches(
    task: str,
    examples: Sequence[Example],
    tokenizer: WordPieceTokenizer,
    max_length: int,
    batch_size: int,
    separate_pairs: bool = True,
) -> list[TaskBatch]:
    """Batches in file order, for evaluation and prediction (no augmentation)."""
    return [
        make_batch(task, examples[i : i + batch_size], tokenizer, max_length, separate_pairs)
        for i in range(0, len(examples), batch_size)
    ]
