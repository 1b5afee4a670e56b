"""`segexp blame`: its options and the call into segexp.blame."""

from __future__ import annotations

from pathlib import Path

from segexp.files import check_output

from .options import positive_int, seeds_value, store_of


def blame(args) -> int:
    runs = [a for a in args.runs_and_overrides if "=" not in a]
    overrides = [a for a in args.runs_and_overrides if "=" in a]
    if args.out or args.from_table:  # --from-table writes ./blame by default
        check_output(args.out or "blame", "--out", folder=True)
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
        fidelity=args.fidelity,
        screen_options={
            "epochs": args.screen_epochs,
            "fraction": args.screen_fraction,
            "image_size": args.screen_size,
        },
        replicate=args.replicate,
    )
    return 0


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
        "--replicate",
        choices=("seed", "fold", "fold,seed"),
        default="seed",
        help="what replicates a cell: seeds; the folds of A's k-fold split (dataset.folds), each "
        "a block, so a verdict holds over data draws; or folds x --seeds seeds",
    )
    command.add_argument(
        "--train-every-budget",
        action="store_true",
        help="train both levels of a trainer.max_epochs factor, also in a screen's "
        "confirmation (default: read the smaller budget from the larger budget's per-epoch "
        "history where nothing depends on it)",
    )
    command.add_argument(
        "--fidelity",
        choices=("auto", "full", "screen"),
        default="auto",
        help="screen: the design at low fidelity, then its suspects at full fidelity (verdicts "
        "from full-fidelity runs only); auto: screen where the full design costs > 4 A's",
    )
    command.add_argument("--screen-epochs", type=positive_int, help="default: from A's curves")
    command.add_argument(
        "--screen-fraction", type=float, help="share of the training cases (default 1)"
    )
    command.add_argument("--screen-size", type=positive_int, help="px (default: half of A's)")
    command.add_argument("--dry-run", action="store_true", help="print the design, train nothing")
    command.add_argument("--out", default=None, help="folder for effects.csv, report.md, ...")
    command.add_argument(
        "--from-table",
        metavar="RUNS_CSV",
        help="re-analyse a table (0/1 factor columns, seed, the metric) without training",
    )
