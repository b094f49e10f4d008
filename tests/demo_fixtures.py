"""A tiny random-weight BERT folder and a few rows of every CS224N file, for bert_demo tests.

The model folder is in HuggingFace format (config.json, model.safetensors with HF
key names, vocab.txt), so it goes through the same loader as a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SST_ROWS = [
    ("s1", "a great and moving film .", 4),
    ("s2", "a dull , boring mess .", 0),
    ("s3", "the plot is fine but slow .", 2),
    ("s4", "good acting , weak story .", 2),
    ("s5", "i loved every minute of it .", 4),
    ("s6", "not good at all .", 1),
    ("s7", "a fine and funny film .", 3),
    ("s8", "the worst film of the year .", 0),
    ("s9", "slow but moving .", 3),
    ("s10", "boring , but the acting is good .", 1),
]
PAIR_SENTENCES = [
    ("how do i learn to cook ?", "what is the best way to learn cooking ?"),
    ("is the film good ?", "is the film boring ?"),
    ("a man plays a guitar .", "a man is playing the guitar ."),
    ("a dog runs in the park .", "a cat sleeps on the bed ."),
    ("how do i get a job ?", "how can i find a job ?"),
    ("what is a good film ?", "which film should i watch ?"),
    ("the year was slow .", "it was a slow year ."),
    ("a woman is cooking .", "a man plays the guitar ."),
]
WORDS = sorted(
    {w for _, s, _ in SST_ROWS for w in s.split()}
    | {w for a, b in PAIR_SENTENCES for w in (a + " " + b).split()}
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]

TINY_CONFIG = {
    "model_type": "bert",
    "vocab_size": len(VOCAB),
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Random BERT weights under HuggingFace's names, with config.json and vocab.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, inter = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]

    def normal(*shape: int) -> torch.Tensor:
        return 0.2 * torch.randn(*shape, generator=g)

    state = {
        "embeddings.word_embeddings.weight": normal(len(VOCAB), h),
        "embeddings.position_embeddings.weight": normal(TINY_CONFIG["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": normal(2, h),
        "embeddings.LayerNorm.weight": torch.ones(h),
        "embeddings.LayerNorm.bias": torch.zeros(h),
        "pooler.dense.weight": normal(h, h),
        "pooler.dense.bias": torch.zeros(h),
    }
    for i in range(TINY_CONFIG["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            state[p + f"attention.self.{part}.weight"] = normal(h, h)
            state[p + f"attention.self.{part}.bias"] = torch.zeros(h)
        state[p + "attention.output.dense.weight"] = normal(h, h)
        state[p + "attention.output.dense.bias"] = torch.zeros(h)
        state[p + "attention.output.LayerNorm.weight"] = torch.ones(h)
        state[p + "attention.output.LayerNorm.bias"] = torch.zeros(h)
        state[p + "intermediate.dense.weight"] = normal(inter, h)
        state[p + "intermediate.dense.bias"] = torch.zeros(inter)
        state[p + "output.dense.weight"] = normal(h, inter)
        state[p + "output.dense.bias"] = torch.zeros(h)
        state[p + "output.LayerNorm.weight"] = torch.ones(h)
        state[p + "output.LayerNorm.bias"] = torch.zeros(h)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def write_tiny_data(folder: Path) -> Path:
    """Train, dev and test-student files in the CS224N layout (unnamed index column)."""
    folder.mkdir(parents=True, exist_ok=True)
    sst = [[i, sid, " " + text, label] for i, (sid, text, label) in enumerate(SST_ROWS)]
    _write(folder / "ids-sst-train.csv", ["", "id", "sentence", "sentiment"], sst)
    _write(folder / "ids-sst-dev.csv", ["", "id", "sentence", "sentiment"], sst[:6])
    # test-student: an extra leading index column and no label.
    _write(folder / "ids-sst-test-student.csv", ["0", "", "id", "sentence"],
           [[i + 1, float(i), f"t{i}", text] for i, (_, text, _) in enumerate(SST_ROWS[:4])])
    quora = [[i, f"q{i}", a, b, float(i % 2 == 0)] for i, (a, b) in enumerate(PAIR_SENTENCES)]
    header = ["", "id", "sentence1", "sentence2"]
    _write(folder / "quora-train.csv", [*header, "is_duplicate"], quora)
    _write(folder / "quora-dev.csv", [*header, "is_duplicate"], quora[:5])
    sts = [[i, f"p{i}", a, b, round(5.0 - 0.6 * i, 1)] for i, (a, b) in enumerate(PAIR_SENTENCES)]
    _write(folder / "sts-train.csv", [*header, "similarity"], sts)
    _write(folder / "sts-dev.csv", [*header, "similarity"], sts[:5])
    _write(folder / "sts-test-student.csv", header,
           [[i, f"u{i}", a, b] for i, (a, b) in enumerate(PAIR_SENTENCES[:3])])
    return folder


def tiny_args(tiny: tuple[Path, Path], out: Path) -> list[str]:
    """Flags for a two-step CLI run of the tiny model on the tiny data into ``out``."""
    model_dir, data_dir = tiny
    return ["--model", str(model_dir), "--data", str(data_dir), "--out", str(out),
            "--batch-sst", "3", "--batch-para", "2", "--batch-sts", "2", "--max-length", "16",
            "--epochs", "1", "--steps-per-epoch", "2", "--eval-batch-size", "4", "--no-progress",
            # the exact path: a tiny model gains nothing from compiling AdamW or from bf16
            "--adamw-impl", "for-loop", "--precision", "fp32"]
