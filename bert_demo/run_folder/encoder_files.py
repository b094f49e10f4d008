"""The small files of the pretrained model that a run needs later, copied into the run.

A run folder must stay readable when the model it was trained from is moved,
deleted or replaced (``config.model`` may name a cache entry or a folder). The
weights are in the run already; the tokenizer and the model's config.json are
copied into ``RUN/encoder/`` together with ``source.json``, which records where
they came from and each file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bert_demo.run_folder.safe_write import UnsafePath, read_bytes, write_bytes, write_json

ENCODER_FILES_DIR = "encoder"
SOURCE = "source.json"
# vocab.txt is required; the others are copied when the model has them.
REQUIRED = ("config.json", "vocab.txt")
OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_model_files(model_folder: Path, run: Path, source: str | None) -> Path:
    """Copy the tokenizer and config files of ``model_folder`` into ``run/encoder``."""
    target = run / ENCODER_FILES_DIR
    target.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    for name in (*REQUIRED, *OPTIONAL):
        src = model_folder / name
        if not src.is_file():
            if name in REQUIRED:
                raise FileNotFoundError(f"model folder {model_folder} has no {name}")
            continue
        data = src.read_bytes()  # the user's own model folder: links there are theirs
        write_bytes(target / name, data, run)
        hashes[name] = hashlib.sha256(data).hexdigest()
    write_json(target / SOURCE, {"model": source, "folder": str(model_folder), "sha256": hashes},
               run)
    return target


def encoder_files(run: Path) -> Path | None:
    """``run/encoder`` when the run holds its own tokenizer files (runs before it did not).

    A link among them (or ``encoder`` itself a link) is refused: a run from elsewhere must
    not make the tokenizer, or ``export``, read a file outside it.
    """
    folder = run / ENCODER_FILES_DIR
    if folder.is_symlink():
        raise UnsafePath(f"{folder} is a symbolic link; bert_demo does not read a run's files "
                         "through links")
    if not (folder / "vocab.txt").is_file():
        return None
    for name in (*REQUIRED, *OPTIONAL):
        if (folder / name).is_symlink():
            raise UnsafePath(f"{folder / name} is a symbolic link; bert_demo does not read a "
                             "run's files through links")
    return folder


def known_files(folder: Path) -> dict[str, bytes]:
    """The tokenizer and config files of an encoder folder that exist, by name, read without
    following links (what export copies: nothing else the folder may hold)."""
    return {name: read_bytes(folder / name) for name in (*REQUIRED, *OPTIONAL)
            if (folder / name).exists() or (folder / name).is_symlink()}


def read_source(run: Path) -> dict[str, Any]:
    return json.loads((run / ENCODER_FILES_DIR / SOURCE).read_text())
