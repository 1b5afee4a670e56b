"""The `segexp` command: one argparse definition for every subcommand and its `--help`.

Options and Hydra overrides mix in any order (`segexp blame A B --seeds 2 trainer.max_epochs=3`):
each subcommand is parsed with `parse_intermixed_args`. `segexp train` hands its arguments to
Hydra untouched (`segexp train --help` is Hydra's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from segexp import __version__


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


def make_data(args) -> int:
    from segexp import data

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ValueError(f"{out} exists and is not empty: pass --force to write into it")
    if args.layout == "hc18":
        out = data.make_hc18(args.out, n=args.n or 200, seed=args.seed)
    else:
        out = data.make_lgg(
            args.out, n=args.n or 20, seed=args.seed, size=args.size, slices=args.slices
        )
    print(f"wrote synthetic {args.layout} to {out}")
    return 0


def check_data(args) -> int:
    from segexp import config
    from segexp.train import check_run_config

    cfg = config.compose(args.overrides)
    check_run_config(cfg)
    datamodule = config.instantiate(cfg.dataset, "dataset")
    datamodule.prepare_data()
    print(json.dumps(datamodule.summary(), indent=2))
    return 0


def predict(args) -> int:
    from segexp.predict import predict as run_predict

    client, _, _ = store_of(args)
    table = run_predict(
        client, args.run_id, Path(args.images), Path(args.pixel_csv), Path(args.out), args.masks
    )
    missed = int((table.semi_axes_a_mm == 0).sum())
    print(
        f"wrote {len(table)} rows to {args.out}"
        + (f" ({missed} with no head found: zeros)" if missed else "")
    )
    return 0


def blame(args) -> int:
    runs = [a for a in args.runs_and_overrides if "=" not in a]
    overrides = [a for a in args.runs_and_overrides if "=" in a]
    if args.from_table:
        from segexp import config
        from segexp.blame import from_table

        if runs or overrides:
            raise SystemExit("segexp blame: --from-table analyses a table; give no runs")
        out = Path(args.out or "blame")
        from_table(Path(args.from_table), args.metric or config.DEFAULT_METRIC, out)
        print((out / "report.md").read_text())
        return 0
    if len(runs) != 2:
        raise SystemExit(f"segexp blame: expected two run ids (A B), got {runs}")
    from segexp.blame import blame as run_blame

    client, artifact_root, _ = store_of(args)
    run_blame(
        client,
        artifact_root,
        *runs,
        metric=args.metric,
        seeds=args.seeds,
        design=args.design,
        overrides=overrides,
        dry_run=args.dry_run,
        out_dir=args.out and Path(args.out),
        budget=args.budget,
        work_dir=Path(args.work_dir) if args.work_dir else None,  # None: where A's runs live
        nest_epochs=not args.train_every_budget,
    )
    return 0


def seeds_value(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def effects(args) -> int:
    from segexp.compare import effects as sweep_effects

    client, _, _ = store_of(args)
    sweep_effects(client, args.parent_run_id, args.metric, Path(args.out))
    return 0


def compare(args) -> int:
    from segexp.compare import compare as run_compare

    client, _, _ = store_of(args)
    html = args.html and Path(args.html)
    run_compare(client, args.ids, by=args.by, out=Path(args.out), metric=args.metric, html=html)
    return 0


def runs(args) -> int:
    from segexp import tracking

    client, _, _ = store_of(args)
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if not args.experiment or e.name in args.experiment]
    marked = tracking.cleanup_stale_runs(client, ids)
    print(f"marked KILLED: {len(marked)} run(s) whose process is gone")
    for run_id in marked:
        print(f"  {run_id}")
    return 0


def ui(args) -> int:
    from segexp.tracking import ui_command, ui_host_allowed

    if not ui_host_allowed(args.host, args.allow_remote):
        return 2
    client, artifacts, _ = store_of(args)
    command = ui_command(client.tracking_uri, artifacts, args.host, args.port) + args.extra
    print(" ".join(command))
    if not args.print_command:
        os.execv(command[0], command)
    return 0


def server(args) -> int:
    from segexp import config
    from segexp.tracking import serve

    work_dir = Path(args.work_dir or config.compose([]).work_dir).resolve()
    return serve(work_dir, args.port, args.postgres_port)


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


def data_commands(add) -> None:
    """train, make-data, check-data, predict."""
    train = add(
        "train",
        None,
        "train one run, or a sweep with -m (Hydra overrides, e.g. experiment=hc18_seed "
        "optimizer.lr=3e-4; `segexp train --help` is Hydra's)",
        store=False,
    )
    train.add_argument("overrides", nargs="*", help="Hydra overrides")

    command = add("make-data", make_data, "write a synthetic dataset in a real layout", False)
    command.add_argument("layout", choices=["hc18", "lgg"])
    command.add_argument("out", help="output folder (the dataset root)")
    command.add_argument(
        "--n", type=positive_int, help="images (hc18, default 200) or patients (lgg, default 20)"
    )
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--force", action="store_true", help="write into a non-empty folder")
    command.add_argument(
        "--size", type=positive_int, default=256, help="lgg slice size in pixels (real: 256)"
    )
    command.add_argument(
        "--slices",
        type=slice_range,
        default=(20, 88),
        help="lgg slices per patient, MIN-MAX (real data: 20-88)",
    )

    command = add(
        "check-data",
        check_data,
        "validate a dataset and print a summary (e.g. dataset=hc18 dataset.root=PATH)",
        False,
    )
    command.add_argument("overrides", nargs="*", help="Hydra overrides")

    command = add("predict", predict, "HC18 challenge CSV from a run's best checkpoint")
    command.add_argument("run_id")
    command.add_argument("--images", required=True, help="folder of images, e.g. test_set/")
    command.add_argument("--pixel-csv", required=True, help="CSV: filename, 'pixel size(mm)'")
    command.add_argument("--out", required=True, help="submission CSV to write")
    command.add_argument("--masks", default=None, help="also write predicted masks here")


def blame_command(add) -> None:
    """blame."""
    command = add("blame", blame, "which changed hyperparameter between two runs moved the metric")
    command.add_argument(
        "runs_and_overrides",
        nargs="*",
        metavar="RUN_A RUN_B [OVERRIDE ...]",
        help="the two runs, then overrides applied to every training (trainer.max_epochs=3)",
    )
    command.add_argument("--metric", default=None, help="default: A's optimized_metric")
    command.add_argument(
        "--seeds",
        type=seeds_value,
        default=3,
        help="replicates per cell, or `auto`: add seeds in rounds until every verdict settles",
    )
    command.add_argument(
        "--design",
        default="auto",
        help="auto: full 2^k for k <= 4, a resolution IV+ fraction for 5-8; full; fractional; "
        "path: the ablation path; oat: each change alone",
    )
    command.add_argument("--budget", type=positive_int, help="--seeds auto: most trainings")
    command.add_argument(
        "--train-every-budget",
        action="store_true",
        help="train both levels of a trainer.max_epochs factor (default: read the smaller "
        "budget from the larger budget's per-epoch history where nothing depends on it)",
    )
    command.add_argument("--dry-run", action="store_true", help="print the design, train nothing")
    command.add_argument("--out", default=None, help="folder for effects.csv, report.md, ...")
    command.add_argument(
        "--from-table",
        metavar="RUNS_CSV",
        help="re-analyse a table (0/1 factor columns, seed, the metric) without training",
    )


def comparison_commands(add) -> None:
    """effects, compare."""
    command = add(
        "effects",
        effects,
        "which hyperparameter matters across a sweep: ANOVA importance and marginal means",
    )
    command.add_argument("parent_run_id")
    command.add_argument("--metric", default=None, help="default: the runs' optimized_metric")
    command.add_argument("--out", default="effects.png", help="PNG of the marginal means")

    command = add("compare", compare, "runs side by side: what differs and how they did")
    command.add_argument("ids", nargs="+", help="run ids; a sweep (parent) id means its runs")
    command.add_argument("--by", default=None, help="group replicates by this param (seed)")
    command.add_argument("--out", default="compare.png", help="PNG of the curves")
    command.add_argument(
        "--metric", default=None, help="rank by this metric (default: the runs' optimized_metric)"
    )
    command.add_argument("--html", default=None, help="also write a self-contained HTML report")


def store_commands(add) -> None:
    """runs, ui, server."""
    command = add("runs", runs, "housekeeping: mark KILLED the runs whose process is gone")
    command.add_argument("action", choices=["cleanup"])
    command.add_argument("--experiment", action="append", help="only these experiments")

    command = add("ui", ui, "MLflow UI on the store (localhost only unless --allow-remote)")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=int, default=5000)
    command.add_argument("--allow-remote", action="store_true", help="allow a non-local host")
    command.add_argument("--print-command", action="store_true", help="print, start nothing")
    command.add_argument("extra", nargs="*", help="passed to `mlflow server` after --")

    command = add(
        "server",
        server,
        "team tracking server: PostgreSQL and `mlflow server` on 127.0.0.1, data in the work dir",
        store=False,
    )
    command.add_argument("--work-dir", default=None, help="holds postgres/ and artifacts/")
    command.add_argument("--port", type=int, default=5000, help="the MLflow server's port")
    command.add_argument("--postgres-port", type=int, default=None, help="default: a free one")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, commands = build_parser()
    if not argv or argv[0] not in commands:  # --help, --version, or argparse's error
        parser.parse_args(argv or ["--help"])  # --help, or argparse's error for a bad command
        return 2
    if argv[0] == "train":
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


if __name__ == "__main__":
    sys.exit(main())
