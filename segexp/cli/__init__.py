"""The `segexp` command: one argparse definition for every subcommand and its `--help`.

Options and Hydra overrides mix in any order (`segexp blame A B --seeds 2 trainer.max_epochs=3`):
each subcommand is parsed with `parse_intermixed_args`. `segexp train` hands its arguments to
Hydra untouched (`segexp train --help` is Hydra's).
"""

from __future__ import annotations

import argparse
import os
import sys

from segexp import __version__

from .blame import blame_command
from .compare import comparison_commands
from .data import data_commands
from .options import store_options
from .store import store_commands


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser, from one definition."""
    parser = argparse.ArgumentParser(
        prog="segexp", description="Experiment-tracked 2D medical image segmentation."
    )
    parser.add_argument("--version", action="version", version=f"segexp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, handler, help: str, store: bool = True) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help, description=help)
        command.set_defaults(handler=handler)
        if store:
            store_options(command)
        commands[name] = command
        return command

    for define in (data_commands, blame_command, comparison_commands, store_commands):
        define(add)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # a stored config or CSV is a few kB: MLflow's download bars would only bury the output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:  # --help, --version, or argparse's error
        parser.parse_args(argv or ["--help"])  # --help, or argparse's error for a bad command
        return 2
    if argv[0] == "train":
        from segexp.checks import precheck_command_line
        from segexp.config import ConfigError

        try:
            precheck_command_line(argv[1:])
        except ConfigError as err:  # as train() would refuse it, without importing torch
            print(f"segexp train: {err}", file=sys.stderr)
            return 1
        from segexp import train

        # argv[0] is the Hydra app's file: Lightning's DDP launcher re-runs `argv[0] argv[1:]`
        # for the other ranks, and that must start training, not the `segexp` dispatcher.
        sys.argv = [train.__file__, *argv[1:]]
        train.main()
        return 0
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    return run_reporting_errors(argv[0], args)


def run_reporting_errors(name: str, args) -> int:
    """Run a subcommand; bad input (data, config, store, unknown run) is one line and exit 2."""
    from mlflow.exceptions import MlflowException

    from segexp.tracking import ServerError, StoreError

    try:
        return args.handler(args)
    except (
        ValueError,
        StoreError,
        ServerError,
        MlflowException,
    ) as err:  # DataError, ConfigError too
        message = err.message if isinstance(err, MlflowException) else str(err)
        print(f"segexp {name}: {message}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
