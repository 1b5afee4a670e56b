"""`segexp make-data`, `check-data`, `predict` (and `train`, which Hydra parses)."""

from __future__ import annotations

import json
from pathlib import Path

from segexp.files import check_output

from .options import positive_int, slice_range, store_of


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
    from segexp.predict import flags_path
    from segexp.predict import predict as run_predict

    for path in (args.out, flags_path(args.out)):  # the submission and its flags beside it
        check_output(path, "--out")
    if args.masks:
        check_output(args.masks, "--masks", folder=True)
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


def register(args) -> int:
    from segexp.models import registry

    client, _, _ = store_of(args)
    number = registry.register(client, args.run_id, args.name)
    print(f"registered run {args.run_id} as models:/{args.name}/{number}")
    return 0


def data_commands(add) -> None:
    """train, make-data, check-data, predict, register."""
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
    command.add_argument("run_id", help="a run id, or a registered model: models:/NAME/VERSION")
    command.add_argument("--images", required=True, help="folder of images, e.g. test_set/")
    command.add_argument("--pixel-csv", required=True, help="CSV: filename, 'pixel size(mm)'")
    command.add_argument("--out", required=True, help="submission CSV to write")
    command.add_argument("--masks", default=None, help="also write predicted masks here")

    command = add("register", register, "a run's best weights as a version of a registered model")
    command.add_argument("run_id")
    command.add_argument("--name", required=True, help="the registered model's name")
