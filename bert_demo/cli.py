"""``python -m bert_demo train|evaluate|predict|analyze|ablate``.

    python -m bert_demo train                      # the quick preset, packaged MiniLM
    python -m bert_demo train --preset paper --smart --pcgrad --sts-aug --out runs/all
    python -m bert_demo train --out runs/all --resume
    python -m bert_demo evaluate --run runs/quick
    python -m bert_demo predict --run runs/quick  # dev and test-student files -> CSV
    python -m bert_demo analyze --run runs/quick
    python -m bert_demo export --run runs/quick --out exported/quick  # Hugging Face folder
    python -m bert_demo ablate --seeds 1 --preset quick --max-steps 200
    torchrun --nproc_per_node 2 -m bert_demo train --out runs/ddp   # one process per GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import Field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bert_demo.ablation.ablate import ROWS
from bert_demo.config import (
    MODE_ALIASES,
    PRESETS,
    TrainConfig,
    bounds_text,
    check_value,
    field_type,
    preset_config,
)
from bert_demo.run_folder.weights import WEIGHT_CHOICES
from bert_demo.tasks import TASKS
from bert_demo.training.speed import PRECISIONS
from bert_demo.training.weighting import WEIGHTINGS
from gradtools.aggregation import available as available_aggregators

if TYPE_CHECKING:
    from bert_demo.run_folder.folder import RunFolder

DEFAULT_PRESET = "quick"
# The TrainConfig fields that are flags (all but the free-form notes).
_CONFIG_FIELDS = [f for f in fields(TrainConfig) if f.metadata.get("flag", True)]


def _flag(spec: Field[Any]) -> str:
    return "--" + spec.name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if value is None:
        return "none"
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
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
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
        elif spec.name == "aggregator":
            kwargs.update(choices=(*(choices or ()), "none"), action=_AggregatorAction,
                          metavar="NAME")
        elif choices is not None:
            kwargs["choices"] = choices
            if spec.name == "mode":  # old names are accepted and mean the new ones
                kwargs["type"] = lambda text: MODE_ALIASES.get(text, text)
        elif kind in (int, float):
            kwargs.update(type=_number_parser(spec, kind), metavar=kind.__name__.upper())
        else:
            kwargs.update(type=kind)
        parser.add_argument(_flag(spec), **kwargs)
        if spec.name == "aggregator":
            parser.add_argument("--pcgrad", nargs=0, action=_AggregatorAction, dest="aggregator",
                                help="the paper's PCGrad: short for --aggregator pcgrad "
                                "(default: off)")
            parser.add_argument("--no-pcgrad", nargs=0, action=_AggregatorAction,
                                dest="aggregator", help="short for --aggregator none "
                                "(default: the preset's, none)")


class _AggregatorAction(argparse.Action):
    """--aggregator NAME, --pcgrad (NAME pcgrad), --no-pcgrad (none): one setting, given once."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        value = {"--pcgrad": "pcgrad", "--no-pcgrad": "none"}.get(option_string or "", values)
        given = getattr(namespace, "_aggregator_flag", None)
        aliases = ("--pcgrad", "--no-pcgrad")
        if (given is not None and getattr(namespace, self.dest) != value
                and not (given in aliases and option_string in aliases)):  # last one wins
            parser.error(f"{option_string} and {given} both say how the task gradients are "
                         "combined; give one")
        namespace._aggregator_flag = option_string
        setattr(namespace, self.dest, value)


def _add_runtime_flags(parser: argparse.ArgumentParser, precision: bool = False) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: all cores, i.e. torch's count of "
                        f"physical cores unless OMP_NUM_THREADS is set: {torch.get_num_threads()}"
                        " here)")
    if precision:
        # train and ablate take --precision from TrainConfig (it is saved with the run).
        parser.add_argument("--precision", choices=PRECISIONS, default=None,
                            help="forward passes in bf16 autocast or fp32; auto: bf16 where "
                            "the CPU/GPU has bf16 units (default: the run's own --precision, "
                            "so a run evaluated where it trained gives its dev numbers again)")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line."""
    overrides = {
        spec.name: getattr(args, spec.name)
        for spec in _CONFIG_FIELDS
        if getattr(args, spec.name, None) is not None
    }
    if "tasks" in overrides:
        overrides["tasks"] = tuple(overrides["tasks"])
    if overrides.get("aggregator") == "none":
        overrides["aggregator"] = None
    return overrides


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return preset_config(args.preset or DEFAULT_PRESET, **config_overrides(args))


def resumed_config(saved: TrainConfig, args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The saved settings with the flags that may change on --resume; refuses the others.

    Returns the config and a line naming what changed.
    """
    from bert_demo.run_folder.folder import RESUMABLE, refused_on_resume
    from bert_demo.run_folder.run_dir import RunDirError

    if args.preset is not None:
        raise RunDirError("--resume continues with the run's saved settings; drop --preset")
    given = config_overrides(args)
    changed = {k: v for k, v in given.items() if getattr(saved, k) != v}
    # RunFolder's rule; here with the values, as the flags were typed.
    refused = refused_on_resume(saved, saved.with_overrides(**changed)) if changed else []
    if refused:
        shown = ", ".join(f"--{k.replace('_', '-')} {_shown(changed[k])} (the run has "
                          f"{_shown(getattr(saved, k))})" for k in refused)
        allowed = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE)
        raise RunDirError(f"--resume keeps the run's settings; refusing {shown}. "
                          f"Only {allowed} may change on --resume")
    if not changed:
        return saved, "with its saved settings"
    applied = ", ".join(f"--{k.replace('_', '-')} {_shown(v)} (was {_shown(getattr(saved, k))})"
                        for k, v in changed.items())
    return saved.with_overrides(**changed), f"with {applied}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _add_run_flags(
    parser: argparse.ArgumentParser, eval_limit: bool = True, data: bool = True
) -> None:
    """--run, --weights, --no-progress, --data (and --max-eval-examples) of the commands
    that read a trained run."""
    parser.add_argument("--run", required=True,
                        help="run folder (or one of its weight files or its checkpoint.pt)")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default="best",
                        help="best: the weights of the best dev evaluation; last: those after "
                        "the last step (default: best)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar, for logs (default: a progress bar on stderr)")
    if not data:
        return
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
    train.add_argument("--keep-checkpoint", action="store_true",
                       help="keep checkpoint.pt (optimizer state included) when the run "
                       "finishes (default: off; model.safetensors and best.safetensors stay)")
    train.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                       help="log metrics.jsonl's scalars to RUN/tensorboard (default: on when "
                       "the tensorboard package is installed)")
    _add_runtime_flags(train)

    evaluate = sub.add_parser("evaluate", help="dev metrics of a trained run")
    _add_run_flags(evaluate)
    _add_runtime_flags(evaluate, precision=True)

    predict = sub.add_parser("predict", help="predictions for labeled or unlabeled files, to CSV")
    _add_run_flags(predict, eval_limit=False)
    predict.add_argument("--input", nargs="+", default=None,
                         help="files to predict, in the CS224N tab-separated format (as "
                         "ids-sst-test-student.csv, quora-dev.csv; labels optional) (default: "
                         "every dev and test-student file)")
    predict.add_argument("--task", choices=tuple(TASKS), default=None,
                         help="task of --input (default: guessed from each file name)")
    predict.add_argument("--output", default=None,
                         help="CSV path for one --input, else a folder; each row holds the id, "
                         "the predicted label and the probabilities (or unclipped score) "
                         "(default: RUN/predictions)")
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
    ablate.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                        help="only these rows: " + ", ".join(r.slug for r in ROWS)
                        + " (or their names as in the table; default: all of these), or a row "
                        "for any aggregator or loss weighting, the finetune baseline with it: "
                        "agg-NAME (--aggregator NAME: " + ", ".join(available_aggregators())
                        + ") or weight-NAME (--weighting NAME: " + ", ".join(WEIGHTINGS) + ")")
    ablate.add_argument("--out", default="runs/ablation",
                        help="folder of all runs and the table (default: runs/ablation)")
    ablate.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: progress bars)")
    ablate.add_argument("--table-only", action="store_true",
                        help="train nothing: write the table from the runs that finished (default: "
                        "train the runs not finished, then write the table)")
    ablate.add_argument("--jobs", type=_positive_int, default=1, metavar="INT",
                        help="runs trained at once, in separate processes that split the "
                        "threads (--threads or all cores) evenly (default: 1)")
    _add_runtime_flags(ablate)

    export = sub.add_parser("export", help="the fine-tuned encoder as a Hugging Face folder, "
                            "plus the task heads")
    _add_run_flags(export, eval_limit=False, data=False)
    export.add_argument("--out", required=True,
                        help="new folder to write (must not exist, or be empty)")
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
    # The command line as typed, recorded where results must say how they were made.
    args.command_line = "python -m bert_demo " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    missing = _missing_demo_modules()
    if missing:
        # The wheel is the library alone; the demo's packages come with the clone's demo extra.
        _fail(parser, f"the demo needs the demo extra (missing: {', '.join(missing)}); "
                      "install it in the clone with: pip install -e '.[demo]'")
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            _fail(parser, f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from bert_demo.ablation.ablate import AblationFailed
    from bert_demo.run_folder.lock import RunLocked
    from bert_demo.run_folder.run_dir import RunDirError
    from bert_demo.run_folder.safe_write import DiskFull
    from bert_demo.training.optim import FeatureUnavailable

    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _fail(parser, f"only 'train' runs under torchrun; run '{args.command}' as one process")
    from bert_demo.training.train import TrainingDiverged

    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (TrainingDiverged, AblationFailed, DiskFull) as e:
        # Not a usage error: the settings were valid but a run failed (for ablate, the
        # other runs finished and their table was written), or the disk filled up (the
        # file being written was left as it was).
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FeatureUnavailable, RunDirError, RunLocked) as e:
        _fail(parser, str(e))
    except OSError as e:  # a read-only folder, a file where a folder should be, ...
        where = e.filename if e.filename is not None else "a file"
        _fail(parser, f"{where}: {e.strerror or e}")
    return 2


def _cmd_train(args: argparse.Namespace) -> int:
    from bert_demo.run_folder.folder import RunFolder
    from bert_demo.run_folder.run_dir import RunDirError
    from bert_demo.training.distributed import from_env
    from bert_demo.training.train import train

    # Under torchrun: join the other processes (a no-op for a single process).
    ranks, device = from_env(args.device)
    try:
        out = Path(args.out or f"runs/{args.preset or DEFAULT_PRESET}")
        if args.resume:

            def saved_config() -> TrainConfig:
                saved = RunFolder(out).saved_config_if_any()
                if saved is None:
                    raise RunDirError(f"--resume: {out} holds no run to resume (its settings, "
                                      "config.json, are missing)")
                return saved

            # rank 0's disk is the one that counts
            config, how = resumed_config(ranks.on_main(saved_config), args)
            if ranks.is_main:
                print(f"resuming {out} {how}")
        else:
            config = config_from_args(args)
        final = train(config, out, resume=args.resume, device=device,
                      progress=not args.no_progress, ranks=ranks,
                      keep_checkpoint=args.keep_checkpoint, tensorboard=args.tensorboard)
        if ranks.is_main:
            best = final.get("best") or {}  # runs before best weights have none
            print(json.dumps({"out": str(out), "wall_s": final["wall_s"], **final["dev"],
                              "best_step": best.get("step")}, indent=2))
    except BaseException:
        ranks.shutdown(together=False)
        raise
    ranks.shutdown()
    if ranks.distributed:
        ranks.exit_process(0)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from bert_demo.run_folder.folder import RunFolder

    if not Path(args.run).is_dir():  # a weights file: nothing is written
        return _evaluate(args, None)
    # The result is written under the run's lock: a train writing the run meanwhile refuses
    # to start, or makes this evaluate refuse.
    folder = RunFolder(args.run).acquire("evaluate")
    try:
        return _evaluate(args, folder)
    finally:
        folder.release()


def _evaluate(args: argparse.Namespace, folder: RunFolder | None) -> int:
    from bert_demo.evaluation.evaluate import evaluate
    from bert_demo.run_folder.run_dir import load_run, resolve_device
    from bert_demo.tasks import get_task
    from bert_demo.tasks.data import find_data_dir, load_split, require_rows
    from bert_demo.training.speed import autocast, resolve_precision

    device = resolve_device(args.device)
    trained = load_run(args.run, device, args.weights)
    model, config = trained.model, trained.config
    data_dir = find_data_dir(args.data if args.data is not None else config.data)
    tasks = tuple(model.heads)
    dev = load_split(data_dir, tasks, "dev", args.max_eval_examples, random_subset=False)
    require_rows(data_dir, "dev", dev, args.max_eval_examples)
    precision = resolve_precision(args.precision or config.precision, device)
    with autocast(precision, device):
        metrics = evaluate(model, dev, trained.tokenizer, config.max_length,
                           config.eval_batch_size, device, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    if folder is not None:
        # The metrics, and what they were measured on: which weights, which rows.
        folder.save_evaluation({
            **metrics,
            "step": trained.step,
            "weights": trained.weights_file.name,
            "precision": precision,
            "examples": {t: len(dev[t]) for t in tasks},
            "data_files": {t: str(data_dir / get_task(t).file_name("dev")) for t in tasks},
        })
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from bert_demo.evaluation.predict import predict_files

    written = predict_files(args.run, args.input, args.task, args.output, args.data, args.device,
                            args.weights, progress=not args.no_progress, precision=args.precision)
    for path, rows in written:
        print(f"{path}: {rows} rows")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from bert_demo.evaluation.analyze import analyze

    report = analyze(args.run, args.out, args.top, args.data, args.max_eval_examples, args.device,
                     args.weights, progress=not args.no_progress, precision=args.precision)
    print(f"wrote {report}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from bert_demo.ablation.ablate import run_ablation
    from bert_demo.training.train import train

    base = config_from_args(args)
    # --table-only summarizes the ablation the same command (without it) trains.
    command = args.command_line.replace(" --table-only", "")
    table = run_ablation(base, Path(args.out), args.seeds, rows=args.rows, device=args.device,
                         progress=not args.no_progress, train=train, jobs=args.jobs,
                         threads=torch.get_num_threads(), command=command,
                         table_only=args.table_only)
    print(table.read_text())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bert_demo.export import export_run

    out = export_run(args.run, args.out, args.weights)
    print(f"wrote {out}")
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "analyze": _cmd_analyze,
    "ablate": _cmd_ablate,
    "export": _cmd_export,
}


if __name__ == "__main__":
    sys.exit(main())
