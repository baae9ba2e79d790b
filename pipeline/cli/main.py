"""Command line: `zero-pipeline COMMAND ...`, or `python -m pipeline COMMAND ...` (see README.md; `--help` lists the commands).

`train` is what every rank runs under the `deepspeed` launcher (`zero-pipeline launch`, or ./launch.sh);
the other commands (predict, export, doctor, check-config, plan, verify-accumulation, plot, comms,
bench) are plain single processes or start their own ranks. verify-accumulation, comms and bench
are tools (`pipeline.tools`): this front door imports one only when its command runs.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import importlib
import sys

from .. import tasks
from ..core import dist
from ..core.base import ConfigError
from ..core.launch_file import read_launch_file
from ..core.options import TrainConfig, add_train_options, command_settings, unknown_options_message
from . import check, plan, plot

# At exit the interpreter's last collections walk the millions of objects torch, DeepSpeed and
# transformers made at import: 3-4 s per rank on a 2-core machine, 0.2 s with them frozen. The memory
# goes back with the process; files and trackers are closed explicitly before. Registered at import,
# so it runs after every exit handler registered later (atexit is last in, first out).
atexit.register(gc.freeze)

# Tool commands: (module in pipeline.tools, help). The module is imported only for its own command,
# so `train` and the other runtime commands never load the tools.
TOOLS = {
    "verify-accumulation": (
        "audit",
        "one optimizer step as a big batch and as accumulated micro-batches: "
        "largest parameter/gradient difference against the precision's tolerance",
    ),
    "comms": ("comms", "collectives per optimizer step by kind (DeepSpeed comms logger), per ZeRO stage and accumulation"),
    "bench": ("bench", "throughput, start-up, data wait and memory: this pipeline vs a minimal DeepSpeed loop vs HF Trainer"),
    "smoke": ("smoke", "CI check on 2 CPU ranks: a config and hostfile resolve, train, save, resume and export a tiny model"),
}


def _tool(command: str):
    return importlib.import_module(f"pipeline.tools.{TOOLS[command][0]}")


def _run_tool(args):
    return _tool(args.command).main(args)


TRAIN_COMMANDS = {
    "train": "train, evaluate, checkpoint and export (run under the deepspeed launcher)",
    "pretrain": "masked-LM pretraining on unlabelled --text-file records (train with task masked_lm; ./launch.sh pretrain)",
}


def _train_parser(sub, command: str):
    parser = sub.add_parser(command, help=TRAIN_COMMANDS[command], allow_abbrev=False)
    add_train_options(parser, {"task": tasks.names()})
    parser.add_argument(
        "--launch-file",
        dest="launch_file",
        help="the whole run, as `zero-pipeline launch` resolved it (what its ranks are given)",
    )
    return parser


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predictions from an exported model (labels and probabilities, or what its task gives)")
    p.add_argument("--model", required=True, help="export directory (RUN_DIR/export)")
    p.add_argument(
        "--input", help=".jsonl/.json/.csv/.tsv/.parquet (with a text column) or .txt (one text per line); default: stdin"
    )
    p.add_argument("--output", help="write JSON lines here instead of stdout")
    p.add_argument("--text-column", default="text")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --input or stdin, e.g. gb18030 (default: %(default)s)")
    p.add_argument("--id-column", default="id", help="copied into each output row where a record has it (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: %(default)s)")
    p.add_argument("--device", choices=["cuda", "cpu"], help="where the model runs (default: a GPU when there is one)")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="weights and compute (fp16: GPUs only; default: %(default)s)",
    )
    p.add_argument(
        "--thresholds", help="multi-label models: a .json file {label: threshold} instead of the export's thresholds.json"
    )


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="consolidate a checkpoint's ZeRO shards into a Hugging Face model (any world size)")
    p.add_argument("checkpoint", help="checkpoint directory, e.g. RUN_DIR/checkpoints/step-500")
    p.add_argument("output", help="export directory to write (written beside it, renamed when verified); new or empty")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it holds an earlier export (nothing else)")


def _doctor_parser(sub) -> None:
    from ..launch.doctor import add_arguments

    add_arguments(sub.add_parser("doctor", help="check every host of a hostfile before launching (ssh, versions, disk, port)"))


def _train(args) -> int:
    dist.import_deepspeed()  # before the config's checks, the first to import it
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.launch_file and (overrides or args.config):
        raise ConfigError(f"--launch-file holds the whole run: no other training options with it (got {', '.join(overrides)})")
    if args.launch_file:  # its environment values are set before the engine's libraries read them
        cfg = read_launch_file(args.launch_file, args.command)
    else:
        cfg = TrainConfig.from_sources(args.config, command_settings(args.command, overrides))

    from ..core.stop import EXIT_CODE, Stopped, exit_as_stopped
    from ..train.run import run

    try:
        run(cfg)
    except Stopped as e:
        exit_as_stopped()
        dist.get_logger().info(str(e))
        dist.shutdown()
        return EXIT_CODE
    dist.shutdown()
    return 0


def _export(args) -> None:
    from pathlib import Path

    from ..checkpoint.export import export_checkpoint

    print(f"export (verified): {export_checkpoint(Path(args.checkpoint), Path(args.output), args.overwrite)}")


def _predict(args) -> None:
    from .predict import main as predict_main

    predict_main(args)


def _doctor(args) -> int:
    from ..launch.doctor import main as doctor_main

    return doctor_main(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher may insert --local_rank=N anywhere; the rank comes from the environment.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if argv[:1] == ["launch"]:  # ./launch.sh: its own options, then training options passed on to `train`
        from ..launch.launcher import main as launch_main

        return launch_main(argv[1:])
    parser = argparse.ArgumentParser(prog="zero-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # Listed for --help only: `launch` is handled above, before this parser (its options are launch.sh's).
    sub.add_parser(
        "launch",
        help="check, then start training on every local GPU, a hostfile's slots or a SLURM allocation (./launch.sh; launch --help)",
    )
    train_parsers = {command: _train_parser(sub, command) for command in TRAIN_COMMANDS}
    _predict_parser(sub)
    _doctor_parser(sub)
    _export_parser(sub)
    check.add_parser(sub)
    plan.add_parser(sub)
    plot.add_parser(sub)
    for command, (_, help_text) in TOOLS.items():
        tool_parser = sub.add_parser(command, help=help_text)
        if argv[:1] == [command]:  # its options are the tool's own
            _tool(command).add_arguments(tool_parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's own message, with the nearest known option for a misspelt one
        parser.error(unknown_options_message(unknown, train_parsers.get(args.command, parser)))
    commands = {
        "train": _train,
        "pretrain": _train,
        "predict": _predict,
        "export": _export,
        "doctor": _doctor,
        "check-config": check.check_config,
        "plan": plan.run_plan,
        "plot": plot.main,
        **dict.fromkeys(TOOLS, _run_tool),
    }
    try:
        return commands[args.command](args) or 0
    except ConfigError as e:
        if dist.is_main():
            print(f"error: {e}", file=sys.stderr)
        dist.shutdown(wait_for_others=False)
        return 2
