"""The `segexp` command: train, make-data, check-data."""

from __future__ import annotations

import argparse
import json
import os
import sys

USAGE = """usage: segexp COMMAND [ARGS]

commands:
  train [OVERRIDES]           train one run (Hydra overrides, e.g. experiment=hc18_seed optimizer.lr=3e-4)
  make-data {hc18,lgg} OUT    write a synthetic dataset in the real on-disk layout
  check-data [OVERRIDES]      validate a dataset and print a summary, e.g. dataset=hc18 dataset.root=PATH
  predict RUN_ID --images DIR --pixel-csv CSV --out submission.csv [--masks DIR]
                              HC18 challenge CSV from a run's best checkpoint
  blame RUN_A RUN_B [--seeds 3] [--design auto|factorial|oat] [--metric val/dice_best] [--dry-run] [OVERRIDES]
                              which changed hyperparameter moved the metric, with 95% CIs over seeds
  effects PARENT_RUN_ID [--metric val/dice_best]
                              marginal means per level of the params its child runs vary; no new runs
  compare RUN_OR_SWEEP_ID... [--by seed] [--out compare.png]
                              the params that differ, val/dice_best, status, duration; curves overlaid
  ui [--port 5000] [--host 127.0.0.1 [--allow-remote]]
                              MLflow UI on the store (localhost only unless --allow-remote)
  runs cleanup [--experiment NAME]
                              mark KILLED the RUNNING runs whose process on this host is gone
"""


def make_data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="segexp make-data", description="Write a synthetic dataset in a real layout."
    )
    parser.add_argument("layout", choices=["hc18", "lgg"])
    parser.add_argument("out", help="output folder (the dataset root)")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="images (hc18, default 200) or patients (lgg, default 20)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size", type=int, default=256, help="lgg slice size in pixels (real data: 256)"
    )
    parser.add_argument(
        "--slices", default="20-88", help="lgg slices per patient, MIN-MAX (real data: 20-88)"
    )
    args = parser.parse_args(argv)
    from segexp import synthetic

    if args.layout == "hc18":
        out = synthetic.make_hc18(args.out, n=args.n or 200, seed=args.seed)
    else:
        low, high = (int(x) for x in args.slices.split("-"))
        out = synthetic.make_lgg(
            args.out, n=args.n or 20, seed=args.seed, size=args.size, slices=(low, high)
        )
    print(f"wrote synthetic {args.layout} to {out}")
    return 0


def check_data(overrides: list[str]) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from segexp.cases import DataError
    from segexp.train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    try:
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
    except (DataError, ValueError) as err:
        print(f"check-data: {err}", file=sys.stderr)
        return 2
    print(json.dumps(datamodule.summary(), indent=2))
    return 0


def predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="segexp predict", description="HC18 submission CSV from a run's best checkpoint."
    )
    parser.add_argument("run_id")
    parser.add_argument("--images", required=True, help="folder of images, e.g. HC18's test_set/")
    parser.add_argument("--pixel-csv", required=True, help="CSV with filename and 'pixel size(mm)'")
    parser.add_argument("--out", required=True, help="submission CSV to write")
    parser.add_argument(
        "--masks", default=None, help="also write predicted masks (original size) here"
    )
    store_args(parser)
    args = parser.parse_args(argv)
    from pathlib import Path

    from segexp.cases import DataError
    from segexp.predict import predict as run_predict

    try:
        table = run_predict(
            client_of(args),
            args.run_id,
            Path(args.images),
            Path(args.pixel_csv),
            Path(args.out),
            args.masks,
        )
    except DataError as err:
        print(f"predict: {err}", file=sys.stderr)
        return 2
    missed = int((table.semi_axes_a_mm == 0).sum())
    print(
        f"wrote {len(table)} rows to {args.out}"
        + (f" ({missed} with no head found: zeros)" if missed else "")
    )
    return 0


def blame(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="segexp blame", description="Which change between two runs moved the metric."
    )
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument(
        "overrides", nargs="*", help="applied to every training, e.g. trainer.max_epochs=3"
    )
    parser.add_argument("--metric", default="val/dice_best")
    parser.add_argument(
        "--seeds", type=int, default=3, help="replicates per design cell (>= 2 for CIs)"
    )
    parser.add_argument("--design", default="auto", choices=["auto", "factorial", "oat"])
    parser.add_argument(
        "--dry-run", action="store_true", help="print the factors and the design, train nothing"
    )
    parser.add_argument(
        "--out", default=None, help="folder for effects.csv, runs.csv, effects.png, report.md"
    )
    store_args(parser)
    args = parser.parse_args(argv)
    from pathlib import Path

    from segexp import tracking
    from segexp.blame import blame as run_blame

    _, artifacts = tracking.store_locations({"uri": args.tracking_uri}, Path(args.work_dir))
    run_blame(
        client_of(args),
        artifacts,
        args.run_a,
        args.run_b,
        metric=args.metric,
        seeds=args.seeds,
        design=args.design,
        overrides=args.overrides,
        dry_run=args.dry_run,
        out_dir=args.out and Path(args.out),
    )
    return 0


def effects(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="segexp effects", description="Main effects over an existing sweep or blame."
    )
    parser.add_argument("parent_run_id")
    parser.add_argument("--metric", default="val/dice_best")
    store_args(parser)
    args = parser.parse_args(argv)
    from segexp.blame import sweep_effects

    sweep_effects(client_of(args), args.parent_run_id, args.metric)
    return 0


def store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        default=os.environ.get("SEGEXP_WORK_DIR", "mlruns"),
        help="segexp work dir (default store)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: MLFLOW_TRACKING_URI, else the work dir's)",
    )


def client_of(args):
    from pathlib import Path

    from segexp import tracking

    uri, artifacts = tracking.store_locations({"uri": args.tracking_uri}, Path(args.work_dir))
    return tracking.prepare_store(uri, artifacts)


def compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="segexp compare", description="Runs side by side: what differs, and how they did."
    )
    parser.add_argument("ids", nargs="+", help="run ids; a sweep (parent) id means its child runs")
    parser.add_argument(
        "--by", default=None, help="group replicates by this param (e.g. seed): mean and std"
    )
    parser.add_argument("--out", default="compare.png", help="PNG of val/dice and val/loss curves")
    store_args(parser)
    args = parser.parse_args(argv)
    from pathlib import Path

    from segexp.compare import compare as run_compare

    run_compare(client_of(args), args.ids, by=args.by, out=Path(args.out))
    return 0


def runs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="segexp runs", description="Housekeeping of runs.")
    parser.add_argument("action", choices=["cleanup"])
    parser.add_argument("--experiment", action="append", help="only these experiments")
    store_args(parser)
    args = parser.parse_args(argv)
    from segexp import tracking

    client = client_of(args)
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if not args.experiment or e.name in args.experiment]
    marked = tracking.cleanup_stale_runs(client, ids)
    print(f"marked KILLED: {len(marked)} run(s) whose process is gone")
    for run_id in marked:
        print(f"  {run_id}")
    return 0


REMOTE_ADVICE = """segexp ui: {host} exposes the MLflow server, which has no authentication by default, to
every machine that can reach this one. If that is what you want:
  - keep MLflow's security middleware on and name who may connect:
      --allowed-hosts 'my-host.example.org:*' --cors-allowed-origins 'https://my-host.example.org'
  - turn on authentication: `mlflow server --app-name basic-auth` (set MLFLOW_FLASK_SERVER_SECRET_KEY)
  - or keep it on 127.0.0.1 and reach it through an SSH tunnel: ssh -L 5000:127.0.0.1:5000 HOST
Pass --allow-remote to bind {host} anyway."""


def ui(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="segexp ui", description="MLflow UI on the segexp store, bound to localhost."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a host other than localhost (prints the security advice)",
    )
    parser.add_argument(
        "--print-command", action="store_true", help="print the mlflow command, start nothing"
    )
    parser.add_argument(
        "extra", nargs="*", help="passed to `mlflow server` after --, e.g. -- --app-name basic-auth"
    )
    store_args(parser)
    args = parser.parse_args(argv)
    from pathlib import Path

    from segexp import tracking

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(REMOTE_ADVICE.format(host=args.host), file=sys.stderr)
        if not args.allow_remote:
            return 2
    uri, artifacts = tracking.store_locations({"uri": args.tracking_uri}, Path(args.work_dir))
    tracking.prepare_store(uri, artifacts)
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifacts,
        "--host",
        args.host,
        "--port",
        str(args.port),
        *args.extra,
    ]
    print(" ".join(command))
    if args.print_command:
        return 0
    os.execv(command[0], command)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from segexp import train

        # argv[0] is the Hydra app's file: Lightning's DDP launcher re-runs `argv[0] argv[1:]`
        # for the other ranks, and that must start training, not the `segexp` dispatcher.
        sys.argv = [train.__file__, *rest]
        train.main()
        return 0
    commands = {
        "make-data": make_data,
        "check-data": check_data,
        "predict": predict,
        "blame": blame,
        "effects": effects,
        "compare": compare,
        "runs": runs,
        "ui": ui,
    }
    if command in commands:
        return commands[command](rest)
    print(f"segexp: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
