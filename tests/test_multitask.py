"""The three heads on the shared encoder, the task losses, and batch construction."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from demo_fixtures import PAIR_SENTENCES, SST_ROWS, write_tiny_model

from bert_demo.model import load_pretrained
from bert_demo.model.multitask import HeadSettings, MultitaskBert, mean_pool, predictions, task_loss
from bert_demo.model.tokenizer import load_tokenizer
from bert_demo.tasks.batching import batch_indices, batches_per_pass, make_batch
from bert_demo.tasks.data import PairExample, SentenceExample


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


pytestmark = pytest.mark.usefixtures("one_thread")


def build(model_dir: Path, **settings) -> MultitaskBert:
    torch.manual_seed(0)
    return MultitaskBert(load_pretrained(model_dir), HeadSettings(**settings)).eval()


SENTENCES = [SentenceExample(i, text, label) for i, text, label in SST_ROWS[:4]]
PAIRS = [PairExample(f"p{i}", a, b, 3.0) for i, (a, b) in enumerate(PAIR_SENTENCES[:3])]


@pytest.mark.parametrize("encoding", ["separate", "cross"])
def test_output_shapes(model_dir, encoding) -> None:
    model = build(model_dir, pair_encoding=encoding)
    tok = load_tokenizer(model_dir)
    sst = make_batch("sst", SENTENCES, tok, 16, model.separate_pairs)
    assert model("sst", sst.input_ids, sst.attention_mask, sst.token_type_ids).shape == (4, 5)
    for task in ("para", "sts"):
        batch = make_batch(task, PAIRS, tok, 16, model.separate_pairs)
        rows = 6 if encoding == "separate" else 3
        assert batch.input_ids.shape[0] == rows
        out = model(task, batch.input_ids, batch.attention_mask, batch.token_type_ids)
        assert out.shape == (3,)


def test_forward_is_embed_then_forward_from_embeddings(model_dir) -> None:
    model = build(model_dir)
    tok = load_tokenizer(model_dir)
    batch = make_batch("para", PAIRS, tok, 16)
    embeds = model.embed(batch.input_ids, batch.token_type_ids)
    split = model.forward_from_embeddings("para", embeds, batch.attention_mask)
    whole = model("para", batch.input_ids, batch.attention_mask, batch.token_type_ids)
    torch.testing.assert_close(split, whole, rtol=0, atol=0)


def test_separate_pairs_encode_each_sentence_alone(model_dir) -> None:
    """The separate-mode score equals the head applied to the two sentences encoded one by one."""
    model = build(model_dir, sts_head="cosine", pooling="mean")
    tok = load_tokenizer(model_dir)
    batch = make_batch("sts", PAIRS[:1], tok, 16)
    score = model("sts", batch.input_ids, batch.attention_mask, batch.token_type_ids)

    def vector(text: str) -> torch.Tensor:
        enc = tok.encode([text], max_length=16)
        out = model.encoder(enc.input_ids, enc.attention_mask, enc.token_type_ids)
        return mean_pool(out.last_hidden_state, enc.attention_mask)

    u, v = vector(PAIRS[0].sentence1), vector(PAIRS[0].sentence2)
    expected = 5.0 * F.cosine_similarity(u, v)  # the head starts at scale 5, shift 0
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-5)


def test_odd_separate_pair_batch_is_refused(model_dir) -> None:
    model = build(model_dir)
    embeds = torch.zeros(3, 4, model.encoder.config.hidden_size)
    with pytest.raises(ValueError, match="even number of rows"):
        model.forward_from_embeddings("sts", embeds, torch.ones(3, 4))


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_losses_match_their_definitions() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 3])
    expected = -(torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(logits, -1)[1, 3]) / 2
    torch.testing.assert_close(task_loss("sst", logits, labels), expected)
    logit, target = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    bce = -(torch.log(torch.sigmoid(logit[0])) + torch.log(1 - torch.sigmoid(logit[1]))) / 2
    torch.testing.assert_close(task_loss("para", logit, target), bce)
    score, gold = torch.tensor([1.0, 4.0]), torch.tensor([2.0, 2.0])
    torch.testing.assert_close(task_loss("sts", score, gold), torch.tensor(2.5))


def test_regression_shapes_must_match() -> None:
    """[B] against [B, 1] would broadcast to [B, B] and train on the wrong target."""
    with pytest.raises(ValueError, match=r"output shape \(4,\) != labels shape \(4, 1\)"):
        task_loss("sts", torch.zeros(4), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="unknown task"):
        task_loss("nli", torch.zeros(4), torch.zeros(4))


def test_predictions() -> None:
    assert predictions("sst", torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0]])).tolist() == [1]
    assert predictions("para", torch.tensor([-0.1, 0.2])).tolist() == [0, 1]
    assert predictions("sts", torch.tensor([-1.0, 2.5, 7.0])).tolist() == [0.0, 2.5, 5.0]


def test_head_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="pooling"):
        HeadSettings(pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head_dropout"):
        HeadSettings(head_dropout=1.0)


def test_sts_aug_appends_every_pair_reversed(model_dir) -> None:
    tok = load_tokenizer(model_dir)
    plain = make_batch("sts", PAIRS, tok, 16)
    doubled = make_batch("sts", PAIRS, tok, 16, sts_aug=True)
    assert doubled.size == 2 * plain.size == 6
    assert doubled.labels is not None and doubled.labels.tolist() == [3.0] * 6
    # Separate mode stacks [first sentences; second sentences]: row i of the
    # reversed half's first side is pair i's second sentence.
    first_of_reversed = doubled.input_ids[3]
    second_of_original = doubled.input_ids[6]
    assert torch.equal(first_of_reversed, second_of_original)
    # stsAug only ever touches the sts task.
    assert make_batch("para", PAIRS, tok, 16, sts_aug=True).size == 3


@pytest.mark.parametrize("buckets", [1, 4])
def test_batch_order_covers_each_example_once_per_pass(buckets) -> None:
    lengths = [(7 * i) % 23 for i in range(50)]
    per_pass = batches_per_pass(50, 6)
    assert per_pass == 9
    seen = Counter(
        i for step in range(per_pass) for i in batch_indices(lengths, 6, step, 0, "sst", buckets)
    )
    assert seen == Counter(range(50))
    first = [batch_indices(lengths, 6, s, 0, "sst", buckets) for s in range(per_pass)]
    again = [batch_indices(lengths, 6, s, 0, "sst", buckets) for s in range(per_pass)]
    second_pass = [batch_indices(lengths, 6, s + per_pass, 0, "sst", buckets)
                   for s in range(per_pass)]
    other_seed = [batch_indices(lengths, 6, s, 1, "sst", buckets) for s in range(per_pass)]
    assert first == again
    assert first != second_pass
    assert first != other_seed


def test_length_buckets_reduce_padding() -> None:
    lengths = list(range(200))

    def spread(buckets: int) -> float:
        batches = [batch_indices(lengths, 8, s, 0, "sts", buckets) for s in range(25)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / 25

    assert spread(5) < spread(1) / 3
