"""`segexp effects`, `fidelity`, `compare`: reading runs back, training nothing."""

from __future__ import annotations

from pathlib import Path

from segexp.files import check_output

from .options import store_of


def effects(args) -> int:
    from segexp.compare import effects as sweep_effects

    check_output(args.out, "--out")
    client, _, _ = store_of(args)
    sweep_effects(client, args.parent_run_id, args.metric, Path(args.out))
    return 0


def fidelity(args) -> int:
    from segexp.compare import fidelity as rank_fidelity

    out = check_output(args.out, "--out", folder=True)
    client, _, _ = store_of(args)
    result = rank_fidelity.fidelity(client, args.parent_run_id, args.metric)
    out.mkdir(parents=True, exist_ok=True)
    result.table().to_csv(out / "fidelity.csv", index=False)
    rank_fidelity.plot(result, out / "fidelity.png")
    print(result.table().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\n".join(rank_fidelity.summary_lines(result)))
    print(f"written: {out / 'fidelity.csv'}, {out / 'fidelity.png'}")
    return 0


def compare(args) -> int:
    from segexp.compare import compare as run_compare

    check_output(args.out, "--out")
    if args.html:
        check_output(args.html, "--html")
    client, _, _ = store_of(args)
    html = args.html and Path(args.html)
    run_compare(client, args.ids, by=args.by, out=Path(args.out), metric=args.metric, html=html)
    return 0


def comparison_commands(add) -> None:
    """effects, compare."""
    command = add(
        "effects",
        effects,
        "which hyperparameter matters across a sweep: ANOVA importance and marginal means over a"
        " grid, Optuna's importance (PED-ANOVA, fANOVA or MDI, named) over a search",
    )
    command.add_argument("parent_run_id")
    command.add_argument("--metric", default=None, help="default: the runs' optimized_metric")
    command.add_argument(
        "--out", default="effects.png", help="PNG of the marginal means (a search: metric by value)"
    )

    command = add(
        "fidelity", fidelity, "how early a sweep's or blame's runs rank as at the end (no training)"
    )
    command.add_argument("parent_run_id")
    command.add_argument("--metric", default=None, help="default: the runs' optimized_metric")
    command.add_argument("--out", default="fidelity", help="folder for fidelity.csv and .png")

    command = add("compare", compare, "runs side by side: what differs and how they did")
    command.add_argument("ids", nargs="+", help="run ids; a sweep (parent) id means its runs")
    command.add_argument(
        "--by", default=None, help="pool replicates over: seed, fold (k-fold CV) or fold,seed"
    )
    command.add_argument("--out", default="compare.png", help="PNG of the curves")
    command.add_argument(
        "--metric", default=None, help="rank by this metric (default: the runs' optimized_metric)"
    )
    command.add_argument("--html", default=None, help="also write a self-contained HTML report")
