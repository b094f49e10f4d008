"""BERT's WordPiece tokenizer, built from a checkpoint's vocab.txt with the `tokenizers` package.

The pipeline is BERT's:

1. normalize: clean control characters, space out CJK characters, and (for
   uncased checkpoints) lower-case and strip accents;
2. pre-tokenize: split on whitespace and punctuation;
3. WordPiece: greedy longest-match sub-words (``playing`` -> ``play ##ing``),
   ``[UNK]`` for a word it cannot cover;
4. template: ``[CLS] A [SEP]`` for one sentence, ``[CLS] A [SEP] B [SEP]`` for a
   pair, with token type 0 for A and 1 for B;
5. pad to the longest sequence in the batch, truncating to ``max_length``
   (for pairs, the longer sentence loses tokens first).

Lower-casing follows ``do_lower_case`` in the checkpoint's tokenizer_config.json
(``True`` when the file or the key is absent, as for the original BERT).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor

from bert_demo.json_file import read_json_object
from bert_demo.model import CheckpointError, resolve_model_path

__all__ = ["Encoding", "WordPieceTokenizer", "load_tokenizer"]

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Encoding(NamedTuple):
    """A padded batch of token ids, each int64 [batch, tokens]."""

    input_ids: Tensor
    attention_mask: Tensor  # 1 for real tokens, 0 for padding
    token_type_ids: Tensor  # 0 for the first sentence, 1 for the second

    def to(self, device: torch.device | str) -> Encoding:
        return Encoding(*(t.to(device) for t in self))


class WordPieceTokenizer:
    """BERT WordPiece tokenization to padded tensors.

    Build it with :meth:`from_folder` (or :func:`load_tokenizer`), then call
    :meth:`encode` with a list of sentences, and optionally a list of second
    sentences for pairs.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike[str],
        *,
        lowercase: bool = True,
        handle_chinese_chars: bool = True,
        strip_accents: bool | None = None,
        model_max_length: int = 512,
    ) -> None:
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise CheckpointError(f"no vocabulary: {vocab_file} does not exist")
        vocab = models.WordPiece.read_file(str(vocab_file))
        absent = [t for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]") if t not in vocab]
        if absent:
            raise CheckpointError(f"{vocab_file} lacks the special token(s) {absent}")
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        # strip_accents=None means "strip when lower-casing", as BERT does.
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True,
            handle_chinese_chars=handle_chinese_chars,
            strip_accents=strip_accents,
            lowercase=lowercase,
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.cls_token_id = vocab["[CLS]"]
        self.sep_token_id = vocab["[SEP]"]
        self.pad_token_id = vocab["[PAD]"]
        self.unk_token_id = vocab["[UNK]"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_token_id), ("[SEP]", self.sep_token_id)],
        )
        tokenizer.decoder = decoders.WordPiece()
        # Special tokens written in the text ("[SEP]") stay whole instead of being split.
        tokenizer.add_special_tokens([t for t in _SPECIAL_TOKENS if t in vocab])
        tokenizer.enable_padding(pad_id=self.pad_token_id, pad_token="[PAD]")
        self._tokenizer = tokenizer
        self.vocab_size = len(vocab)
        self.lowercase = lowercase
        self.model_max_length = model_max_length

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> WordPieceTokenizer:
        """Build from a checkpoint folder: vocab.txt and, when present, tokenizer_config.json."""
        folder = Path(folder)
        settings: dict[str, object] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            settings = read_json_object(config_file)
        strip_accents = settings.get("strip_accents")
        max_length = settings.get("model_max_length", 512)
        # Some configs store a huge sentinel here; the position table caps it anyway.
        if not isinstance(max_length, int) or max_length > 1_000_000:
            max_length = 512
        return cls(
            folder / "vocab.txt",
            lowercase=bool(settings.get("do_lower_case", True)),
            handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
            strip_accents=None if strip_accents is None else bool(strip_accents),
            model_max_length=max_length,
        )

    def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        max_length: int | None = None,
    ) -> Encoding:
        """Tokenize a batch: ``[CLS] text [SEP]``, or ``[CLS] text [SEP] pair [SEP]``.

        Sequences are truncated to ``max_length`` tokens (default: the
        checkpoint's ``model_max_length``) and padded to the longest one.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(
                f"pairs has {len(pairs)} entries but texts has {len(texts)}; they must match"
            )
        if len(texts) == 0:
            raise ValueError("texts is empty")
        max_length = self.model_max_length if max_length is None else max_length
        minimum = 3 if pairs is None else 4  # room for the special tokens and one word each
        if max_length < minimum:
            raise ValueError(f"max_length must be at least {minimum}, got {max_length}")
        self._tokenizer.enable_truncation(max_length, strategy="longest_first")
        inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        encoded = self._tokenizer.encode_batch(inputs)
        return Encoding(
            torch.tensor([e.ids for e in encoded], dtype=torch.long),
            torch.tensor([e.attention_mask for e in encoded], dtype=torch.long),
            torch.tensor([e.type_ids for e in encoded], dtype=torch.long),
        )

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of one text, without [CLS]/[SEP] (for inspection)."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Token ids back to text (lower-cased and with sub-words joined)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(source: str | os.PathLike[str] | None = None) -> WordPieceTokenizer:
    """The tokenizer of a model source (same sources as :func:`bert_demo.model.load_pretrained`)."""
    return WordPieceTokenizer.from_folder(resolve_model_path(source))
