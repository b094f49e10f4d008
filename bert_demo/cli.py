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
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

import torch

from bert_demo.config import (
    PRESETS,
    TrainConfig,
    bounds_text,
    check_value,
    field_type,
    preset_config,
)
from bert_demo.speed import PRECISIONS
from bert_demo.tasks import TASKS

DEFAULT_PRESET = "quick"
# The TrainConfig fields that are flags (all but the free-form notes).
_CONFIG_FIELDS = [f for f in fields(TrainConfig) if f.metadata.get("flag", True)]


def _flag(spec: Field[Any]) -> str:
    return "--" + spec.name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(spec: Field[Any]) -> str:
    """The field's help text and its default under the default preset, then under the others."""

    def value_in(preset: str) -> str:
        value = PRESETS[preset].get(spec.name, spec.default)
        return spec.metadata["unset"] if value is None else _shown(value)

    default = f"default: {value_in(DEFAULT_PRESET)}"
    others = [f"{name} preset: {value_in(name)}" for name in sorted(PRESETS)
              if name != DEFAULT_PRESET and value_in(name) != value_in(DEFAULT_PRESET)]
    return f"{spec.metadata['help']} ({'; '.join([default, *others])})".replace("%", "%%")


def _number_parser(spec: Field[Any], kind: type) -> Callable[[str], Any]:
    """argparse ``type=`` for a numeric field: its type, finite, within its bounds."""
    bounds = bounds_text(spec)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {kind.__name__} value: {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        try:
            check_value(spec, value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text!r}") from None
        return value

    return parse


def _add_config_flags(parser: argparse.ArgumentParser, methods: bool = True) -> None:
    """One flag per TrainConfig field, typed, bounded and documented by the field's metadata."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help="named settings that the other flags override "
                        f"(default: {DEFAULT_PRESET})")
    for spec in _CONFIG_FIELDS:
        kind, _ = field_type(spec)
        choices = spec.metadata.get("choices")
        kwargs: dict[str, Any] = {"default": None, "help": _help(spec), "dest": spec.name}
        if spec.metadata.get("method") and not methods:
            continue  # ablate sets the methods per row
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(nargs="+", choices=choices)
        elif choices is not None:
            kwargs["choices"] = choices
        elif kind in (int, float):
            kwargs.update(type=_number_parser(spec, kind), metavar=kind.__name__.upper())
        else:
            kwargs.update(type=kind)
        parser.add_argument(_flag(spec), **kwargs)


def _add_runtime_flags(parser: argparse.ArgumentParser, precision: bool = False) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: all cores, i.e. torch's count of "
                        f"physical cores unless OMP_NUM_THREADS is set: {torch.get_num_threads()}"
                        " here)")
    if precision:
        # train and ablate take --precision from TrainConfig (it is saved with the run).
        parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                            help="forward passes in bf16 autocast or fp32; auto: bf16 where "
                            "the CPU/GPU has bf16 units (default: auto)")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line."""
    overrides = {
        spec.name: getattr(args, spec.name)
        for spec in _CONFIG_FIELDS
        if getattr(args, spec.name, None) is not None
    }
    if "tasks" in overrides:
        overrides["tasks"] = tuple(overrides["tasks"])
    return overrides


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return preset_config(args.preset, **config_overrides(args))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _add_run_flags(parser: argparse.ArgumentParser, eval_limit: bool = True) -> None:
    """--run, --data (and --max-eval-examples) of the commands that read a trained run."""
    parser.add_argument("--run", required=True, help="run folder (or its checkpoint.pt)")
    parser.add_argument("--data", default=None,
                        help="data folder (default: the one the run was trained on)")
    if eval_limit:
        parser.add_argument("--max-eval-examples", type=_positive_int, default=None,
                            metavar="INT", help="per task, the first rows of each dev file "
                            "(default: all)")


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
                       help="continue the run in --out exactly where it stopped (default: off)")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar (default: a progress bar)")
    _add_runtime_flags(train)

    evaluate = sub.add_parser("evaluate", help="dev metrics of a trained run")
    _add_run_flags(evaluate)
    _add_runtime_flags(evaluate, precision=True)

    predict = sub.add_parser("predict", help="predictions for labeled or unlabeled files, to CSV")
    _add_run_flags(predict, eval_limit=False)
    predict.add_argument("--input", nargs="+", default=None,
                         help="files to predict (default: every dev and test-student file)")
    predict.add_argument("--task", choices=tuple(TASKS), default=None,
                         help="task of --input (default: guessed from each file name)")
    predict.add_argument("--output", default=None,
                         help="CSV path for one --input, else a folder (default: RUN/predictions)")
    _add_runtime_flags(predict, precision=True)

    analyze = sub.add_parser("analyze", help="SST confusion matrix and the largest dev errors")
    _add_run_flags(analyze)
    analyze.add_argument("--out", default=None, help="folder for the report (default: RUN/analysis)")
    analyze.add_argument("--top", type=_positive_int, default=10, metavar="INT",
                         help="errors listed per task (default: 10)")
    _add_runtime_flags(analyze, precision=True)

    ablate = sub.add_parser("ablate", help="the paper's ten ablation rows over N seeds")
    _add_config_flags(ablate, methods=False)
    ablate.add_argument("--seeds", type=int, default=1,
                        help="seeds per row: 0, 1, ... N-1 (default: 1)")
    ablate.add_argument("--rows", nargs="+", default=None,
                        help="only these rows (names as in the table; default: all ten)")
    ablate.add_argument("--out", default="runs/ablation",
                        help="folder of all runs and the table (default: runs/ablation)")
    ablate.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: progress bars)")
    ablate.add_argument("--jobs", type=_positive_int, default=1, metavar="INT",
                        help="runs trained at once, in separate processes that split the "
                        "threads (--threads or all cores) evenly (default: 1)")
    _add_runtime_flags(ablate)
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> None:
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            _fail(parser, f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from bert_demo.ablate import AblationFailed
    from bert_demo.optim import FeatureUnavailable
    from bert_demo.run_dir import RunDirError

    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _fail(parser, f"only 'train' runs under torchrun; run '{args.command}' as one process")
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except AblationFailed as e:
        # Not a usage error: the other runs finished and their table was written.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FeatureUnavailable, RunDirError) as e:
        _fail(parser, str(e))
    return 2


def _cmd_train(args: argparse.Namespace) -> int:
    from bert_demo.distributed import from_env
    from bert_demo.run_dir import CONFIG, RunDirError, load_config
    from bert_demo.train import train

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
                return load_config(out / CONFIG)

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


def _autocast_for(args: argparse.Namespace, device: torch.device) -> Any:
    """The --precision of evaluate/predict/analyze as an autocast context."""
    from bert_demo.speed import autocast, resolve_precision

    return autocast(resolve_precision(args.precision, device), device)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from bert_demo.data import find_data_dir, load_split
    from bert_demo.evaluate import evaluate
    from bert_demo.run_dir import atomic_write, load_trained, resolve_device

    device = resolve_device(args.device)
    model, tokenizer, config = load_trained(args.run, device)
    data_dir = find_data_dir(args.data if args.data is not None else config.data)
    dev = load_split(data_dir, tuple(model.heads), "dev", args.max_eval_examples,
                     random_subset=False)
    with _autocast_for(args, device):
        metrics = evaluate(model, dev, tokenizer, config.max_length, config.eval_batch_size,
                           device)
    print(json.dumps(metrics, indent=2))
    run = Path(args.run)
    if run.is_dir():
        with atomic_write(run / "eval.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from bert_demo.predict import predict_files
    from bert_demo.run_dir import resolve_device

    with _autocast_for(args, resolve_device(args.device)):
        written = predict_files(args.run, args.input, args.task, args.output, args.data,
                                args.device)
    for path, rows in written:
        print(f"{path}: {rows} rows")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from bert_demo.analyze import analyze
    from bert_demo.run_dir import resolve_device

    with _autocast_for(args, resolve_device(args.device)):
        report = analyze(args.run, args.out, args.top, args.data, args.max_eval_examples,
                         args.device)
    print(f"wrote {report}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from bert_demo.ablate import run_ablation
    from bert_demo.train import train

    base = config_from_args(args)
    table = run_ablation(base, Path(args.out), args.seeds, rows=args.rows, device=args.device,
                         progress=not args.no_progress, train=train, jobs=args.jobs,
                         threads=torch.get_num_threads())
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
