"""`export`: a trained run as a Hugging Face BERT folder plus its task heads.

    config.json            BertConfig for transformers' ``BertModel`` (model_type bert)
    model.safetensors      the fine-tuned encoder under Hugging Face's parameter names
    vocab.txt, tokenizer_config.json (and the tokenizer's other files when the model had them)
    heads.safetensors      the task heads, under ``heads.<task>.*``
    heads.json             what the heads are: tasks, outputs, pooling, pair encoding, shapes

``transformers.BertModel.from_pretrained(DIR)`` and ``bert_demo.model.load_pretrained(DIR)``
both read the encoder; :func:`load_export` rebuilds the whole multitask model. The
folder is written under a temporary name and renamed into place, so it is complete
or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bert_demo.model import load_pretrained, resolve_model_path, to_hf_state_dict
from bert_demo.model.multitask import HeadSettings, MultitaskBert
from bert_demo.model.tokenizer import WordPieceTokenizer
from bert_demo.run_folder.encoder_files import encoder_files, known_files
from bert_demo.run_folder.run_dir import load_run
from bert_demo.run_folder.safe_write import DiskFull, umask, write_bytes, write_json
from bert_demo.tasks import get_task

HEADS_WEIGHTS = "heads.safetensors"
HEADS_INFO = "heads.json"
HEADS_FORMAT = "bert_demo-heads-1"
_HEAD_PREFIX = "heads."


class ExportError(ValueError):
    """The export folder cannot be written as asked."""


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; export writes a new "
                          "folder (remove it or choose another)")


def _tokenizer_files(source: Path, target: Path, tokenizer: WordPieceTokenizer) -> None:
    """Copy the tokenizer's known files (never a link, nothing else the folder holds); write a
    tokenizer_config.json when the model had none."""
    for name, data in known_files(source).items():
        if name != "config.json":  # export writes its own, for transformers
            write_bytes(target / name, data)
    if not (target / "tokenizer_config.json").is_file():
        write_json(target / "tokenizer_config.json", {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": tokenizer.lowercase,
            "model_max_length": tokenizer.model_max_length,
        })


def _heads_info(model: MultitaskBert, heads: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    tasks = {}
    for name, module in model.heads.items():
        task = get_task(name)
        tasks[name] = {
            "description": task.description, "kind": task.kind,
            "num_outputs": task.num_outputs, "class_names": list(task.class_names),
            "metric": task.metric_name, "head": type(module).__name__,
            "parameters": {k: list(v.shape) for k, v in heads.items()
                           if k.startswith(f"{_HEAD_PREFIX}{name}.")},
        }
    return {"format": HEADS_FORMAT, "head_settings": asdict(model.settings), "tasks": tasks,
            "run": run}


def export_run(
    run: str | os.PathLike[str], out: str | os.PathLike[str], weights: str = "best"
) -> Path:
    """Write ``out`` (a new or empty folder) from the run's ``weights`` (best or last)."""
    out = Path(out)
    _check_target(out)
    trained = load_run(run, "cpu", weights)
    model = trained.model
    encoder = model.encoder
    state = model.state_dict()
    encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    heads = {k: v.detach().contiguous() for k, v in state.items()
             if k.startswith(_HEAD_PREFIX)}
    tokenizer_source = encoder_files(trained.weights_file.parent) or resolve_model_path(
        trained.config.model)

    from safetensors.torch import save

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_config = {"architectures": ["BertModel"], "model_type": "bert",
                     "position_embedding_type": "absolute", **asdict(encoder.config)}
        write_json(tmp / "config.json", hf_config)
        write_bytes(tmp / "model.safetensors", save(
            to_hf_state_dict(encoder_state, encoder.config.num_hidden_layers),
            metadata={"format": "pt"}))
        _tokenizer_files(tokenizer_source, tmp, trained.tokenizer)
        write_bytes(tmp / HEADS_WEIGHTS, save(heads))
        write_json(tmp / HEADS_INFO, _heads_info(model, heads, {
            "folder": str(Path(run)), "weights": trained.weights_file.name,
            "step": trained.step, "config": trained.config.to_dict()}))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's folder is 0700; a shared folder follows the umask
        _check_target(out)  # still new or empty: nothing raced us to it
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DiskFull) and e.path.parent == tmp:
            raise DiskFull(out / e.path.name) from None  # the name the user gave, not ours
        raise
    return out


def load_export(folder: str | os.PathLike[str]) -> MultitaskBert:
    """The multitask model of an exported folder (encoder and heads), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / HEADS_INFO).read_text())
    if info.get("format") != HEADS_FORMAT:
        raise ValueError(f"{folder / HEADS_INFO} is not a bert_demo heads description")
    model = MultitaskBert(load_pretrained(folder), HeadSettings(**info["head_settings"]),
                          tuple(info["tasks"]))
    heads = load_file(str(folder / HEADS_WEIGHTS), device="cpu")
    missing, unexpected = model.load_state_dict(heads, strict=False)
    wrong = [k for k in missing if k.startswith(_HEAD_PREFIX)] + list(unexpected)
    if wrong:
        raise ValueError(f"{folder / HEADS_WEIGHTS} does not fit heads.json: {sorted(wrong)}")
    return model.eval()
