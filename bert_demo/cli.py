"""``python -m bert_demo train|evaluate|predict|analyze|ablate``.

    python -m bert_demo train                      # the quick preset, packaged MiniLM
    python -m bert_demo train --preset paper --smart --pcgrad --sts-aug --out runs/all
    python -m bert_demo train --out runs/all --resume
    python -m bert_demo evaluate --run runs/quick
    python -m bert_demo predict --run runs/quick  # dev and test-student files -> CSV
    python -m bert_demo analyze --run runs/quick
    python -m bert_demo ablate --seeds 1 --preset quick --max-steps 200
    torchrun --nproc_per_node 2 -m bert_demo train --out runs/ddp   # one process per GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bert_demo.config import MODES, OPTIMIZERS, PRESETS, SCHEDULES, TrainConfig, preset_config
from bert_demo.multitask import TASKS

# Flags of `train` (and `ablate`) that map one to one onto TrainConfig fields.
_CONFIG_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model", {"type": str, "help": "model folder or cached hub id (default: packaged MiniLM)"}),
    ("--data", {"type": str, "help": "data folder (default: $BERT_DEMO_DATA, else ../shared/data)"}),
    ("--seed", {"type": int}),
    ("--epochs", {"type": int}),
    ("--steps-per-epoch", {"type": int, "help": "default: the largest task's batches per pass"}),
    ("--max-steps", {"type": int, "help": "stop after this many steps in all"}),
    ("--max-train-examples", {"type": int, "help": "per task, a fixed random subset"}),
    ("--max-eval-examples", {"type": int, "help": "per task, the first rows of each dev file"}),
    ("--lr", {"type": float}),
    ("--head-lr", {"type": float, "help": "learning rate of the heads (default: --lr)"}),
    ("--weight-decay", {"type": float}),
    ("--schedule", {"choices": SCHEDULES}),
    ("--warmup", {"type": float, "help": "fraction of steps with linear warm-up"}),
    ("--batch-sst", {"type": int}),
    ("--batch-para", {"type": int}),
    ("--batch-sts", {"type": int, "help": "before --sts-aug doubles it"}),
    ("--max-length", {"type": int, "help": "tokens per sentence (or per pair when cross-encoded)"}),
    ("--eval-batch-size", {"type": int}),
    ("--length-buckets", {"type": int, "help": "batches per length-sorted window (1: off)"}),
    ("--optimizer", {"choices": OPTIMIZERS, "help": "adamw is gradtools.AdamW"}),
    ("--mode", {"choices": MODES, "help": "pretrain: frozen encoder, heads only"}),
    ("--encoder-dropout", {"type": float}),
    ("--head-dropout", {"type": float}),
    ("--pooling", {"choices": ("mean", "cls")}),
    ("--pair-encoding", {"choices": ("separate", "cross")}),
    ("--para-head", {"choices": ("features", "cosine")}),
    ("--sts-head", {"choices": ("features", "cosine")}),
    ("--smart-lambda", {"type": float}),
    ("--smart-epsilon", {"type": float}),
    ("--smart-sigma", {"type": float}),
    ("--smart-eta", {"type": float}),
    ("--smart-steps", {"type": int}),
    ("--bregman-mu", {"type": float}),
    ("--log-every", {"type": int}),
]
_METHOD_FLAGS = (
    ("--smart", "SMART adversarial regularization with the momentum Bregman teacher"),
    ("--pcgrad", "PCGrad gradient surgery across the task losses"),
    ("--sts-aug", "STS pair reversal, doubling the STS batch"),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_config_flags(parser: argparse.ArgumentParser, methods: bool = True) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="named settings that the other flags override (default: quick)")
    for flag, kwargs in _CONFIG_FLAGS:
        parser.add_argument(flag, default=None, **kwargs)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                        help="tasks to train (default: all three)")
    if methods:
        for flag, text in _METHOD_FLAGS:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text)


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        _dest(flag): getattr(args, _dest(flag))
        for flag, _ in _CONFIG_FLAGS
        if getattr(args, _dest(flag), None) is not None
    }
    for flag, _ in _METHOD_FLAGS:
        value = getattr(args, _dest(flag), None)
        if value is not None:
            overrides[_dest(flag)] = value
    if args.tasks is not None:
        overrides["tasks"] = tuple(args.tasks)
    return preset_config(args.preset, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bert_demo",
        description="minBERT multitask fine-tuning (SST-5, Quora, STS-B) with gradtools.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune on the three tasks")
    _add_config_flags(train)
    train.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out exactly where it stopped")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_runtime_flags(train)

    evaluate = sub.add_parser("evaluate", help="dev metrics of a trained run")
    evaluate.add_argument("--run", required=True, help="run folder (or its checkpoint.pt)")
    evaluate.add_argument("--data", default=None)
    evaluate.add_argument("--max-eval-examples", type=int, default=None)
    _add_runtime_flags(evaluate)

    predict = sub.add_parser("predict", help="predictions for labeled or unlabeled files, to CSV")
    predict.add_argument("--run", required=True, help="run folder (or its checkpoint.pt)")
    predict.add_argument("--input", nargs="+", default=None,
                         help="files to predict (default: every dev and test-student file)")
    predict.add_argument("--task", choices=TASKS, default=None,
                         help="task of --input (default: guessed from each file name)")
    predict.add_argument("--output", default=None,
                         help="CSV path for one --input, else a folder (default: RUN/predictions)")
    predict.add_argument("--data", default=None)
    _add_runtime_flags(predict)

    analyze = sub.add_parser("analyze", help="SST confusion matrix and the largest dev errors")
    analyze.add_argument("--run", required=True, help="run folder (or its checkpoint.pt)")
    analyze.add_argument("--out", default=None, help="folder for the report (default: RUN/analysis)")
    analyze.add_argument("--top", type=int, default=10, help="errors listed per task")
    analyze.add_argument("--data", default=None)
    analyze.add_argument("--max-eval-examples", type=int, default=None)
    _add_runtime_flags(analyze)

    ablate = sub.add_parser("ablate", help="the paper's ten ablation rows over N seeds")
    _add_config_flags(ablate, methods=False)
    ablate.add_argument("--seeds", type=int, default=1, help="seeds per row (0, 1, ... N-1)")
    ablate.add_argument("--rows", nargs="+", default=None,
                        help="only these rows (names as in the table; default: all ten)")
    ablate.add_argument("--out", default="runs/ablation", help="folder of all runs and the table")
    ablate.add_argument("--no-progress", action="store_true")
    _add_runtime_flags(ablate)
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    parser.exit(2, f"{parser.prog}: error: {message}\n")


# Import names of the `demo` extra's packages that the commands need; gradtools itself needs none.
_DEMO_EXTRA_MODULES = ("tqdm", "tokenizers", "safetensors", "huggingface_hub")


def _missing_demo_modules() -> list[str]:
    return [name for name in _DEMO_EXTRA_MODULES if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = _missing_demo_modules()
    if missing:
        # A library-only install (`pip install gradtools`) still has this script.
        _fail(parser, f"the demo needs the demo extra (missing: {', '.join(missing)}); "
                      'install it with: pip install "gradtools[demo]"')
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            _fail(parser, f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from bert_demo.optim import FeatureUnavailable
    from bert_demo.train import RunDirError

    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _fail(parser, f"only 'train' runs under torchrun; run '{args.command}' as one process")
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FeatureUnavailable, RunDirError) as e:
        _fail(parser, str(e))
    return 2


def _cmd_train(args: argparse.Namespace) -> int:
    from bert_demo.distributed import from_env
    from bert_demo.train import CONFIG, RunDirError, train

    # Under torchrun: join the other processes (a no-op for a single process).
    ranks, device = from_env(args.device)
    try:
        out = Path(args.out or f"runs/{args.preset}")
        if args.resume:

            def saved_config() -> TrainConfig:
                if not (out / CONFIG).is_file():
                    raise RunDirError(
                        f"--resume: {out} holds no run to resume ({CONFIG} is missing)"
                    )
                return TrainConfig.load(out / CONFIG)

            config = ranks.on_main(saved_config)  # rank 0's disk is the one that counts
            if ranks.is_main:
                print(f"resuming {out} with its saved settings")
        else:
            config = config_from_args(args)
        final = train(config, out, resume=args.resume, device=device,
                      progress=not args.no_progress, ranks=ranks)
        if ranks.is_main:
            print(json.dumps({"out": str(out), "wall_s": final["wall_s"], **final["dev"]},
                             indent=2))
    except BaseException:
        ranks.shutdown(together=False)
        raise
    ranks.shutdown()
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from bert_demo.data import find_data_dir
    from bert_demo.datasets import DEV_FILES, load_split
    from bert_demo.evaluate import evaluate
    from bert_demo.train import load_trained, resolve_device

    device = resolve_device(args.device)
    model, tokenizer, config = load_trained(args.run, device)
    data_dir = find_data_dir(args.data if args.data is not None else config.data)
    dev = load_split(data_dir, TASKS, DEV_FILES, args.max_eval_examples, random_subset=False)
    metrics = evaluate(model, dev, tokenizer, config.max_length, config.eval_batch_size, device)
    print(json.dumps(metrics, indent=2))
    run = Path(args.run)
    if run.is_dir():
        (run / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from bert_demo.predict import predict_files

    written = predict_files(args.run, args.input, args.task, args.output, args.data, args.device)
    for path, rows in written:
        print(f"{path}: {rows} rows")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from bert_demo.analyze import analyze

    report = analyze(args.run, args.out, args.top, args.data, args.max_eval_examples, args.device)
    print(f"wrote {report}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from bert_demo.ablate import run_ablation

    base = config_from_args(args)
    table = run_ablation(base, Path(args.out), args.seeds, rows=args.rows, device=args.device,
                         progress=not args.no_progress)
    print(table.read_text())
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "analyze": _cmd_analyze,
    "ablate": _cmd_ablate,
}


if __name__ == "__main__":
    sys.exit(main())
