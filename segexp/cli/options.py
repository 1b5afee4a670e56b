"""Argument types and the store options every subcommand but `server` shares."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def slice_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX, e.g. 20-88, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return low, high


def seeds_value(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        default=None,
        help="segexp work dir holding the default store (default: conf/train.yaml's work_dir, "
        "i.e. $SEGEXP_WORK_DIR or ./mlruns)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: MLFLOW_TRACKING_URI, else the work dir's SQLite store)",
    )


def store_of(args) -> tuple:
    """(client, artifact root, work dir) from the same defaults `segexp train` composes."""
    from segexp import config, tracking

    overrides = [f"work_dir={Path(args.work_dir).resolve()}"] if args.work_dir else []
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    cfg = config.compose(overrides)
    client, artifact_root = tracking.open_store(cfg.tracking, Path(cfg.work_dir))
    return client, artifact_root, Path(cfg.work_dir)
