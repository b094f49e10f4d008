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
import shutil
from pathlib import Path
from typing import Any

from bert_demo.run_folder.run_dir import atomic_write, write_json

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
        with atomic_write(target / name) as tmp:
            shutil.copyfile(src, tmp)
        hashes[name] = sha256(src)
    write_json(target / SOURCE, {"model": source, "folder": str(model_folder), "sha256": hashes})
    return target


def encoder_files(run: Path) -> Path | None:
    """``run/encoder`` when the run holds its own tokenizer files (runs before it did not)."""
    folder = run / ENCODER_FILES_DIR
    return folder if (folder / "vocab.txt").is_file() else None


def read_source(run: Path) -> dict[str, Any]:
    return json.loads((run / ENCODER_FILES_DIR / SOURCE).read_text())
