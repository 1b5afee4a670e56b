"""Screen, then confirm, end to end: real tiny trainings through the joblib launcher."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from helpers import run_segexp

from segexp import tracking
from segexp.tracking import tags

BASE = ["debug=tiny", "model.batch_norm=true", "loss=dice", "dataset.batch_size=2", "seed=1"]


def trained_run(work_dir, hc18_root, *overrides: str) -> str:
    done = run_segexp("train", *BASE, f"dataset.root={hc18_root}", *overrides, work_dir=work_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return re.search(r"^run ([0-9a-f]{32})", done.stdout, re.M).group(1)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_screen_rules_out_the_harmless_change_and_the_confirmation_blames_the_harm(
    work_dir, client, hc18_root
):
    # A learns within 8 epochs; B: lr 0 (nothing learns, the harm), weight decay, 10 epochs
    run_a = trained_run(work_dir, hc18_root, "trainer.max_epochs=8")
    run_b = trained_run(
        work_dir,
        hc18_root,
        "trainer.max_epochs=10",
        "optimizer.lr=0",
        "optimizer.weight_decay=1e-4",
    )
    out = work_dir / "blame"
    args = ["blame", run_a, run_b, "--seeds", "2", "--fidelity", "screen", "--screen-epochs", "4"]
    args += ["--screen-fraction", "1", "hydra/launcher=joblib", "--out", str(out)]
    done = run_segexp(*args, work_dir=work_dir, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    assert "not screened (the screen sets them): trainer.max_epochs" in text
    assert re.search(r"screen check: .* shows it", text), text[-3000:]
    # B trained the longer budget at seed 1: weight decay is held at B's 1e-4 and B is reused
    assert "held at B's levels (B is reused): optimizer.weight_decay" in text
    assert re.search(r"A check: .* within noise", text), text[-3000:]
    assert "optimizer.weight_decay screened out: effect" in text
    assert "confirmed at full fidelity: optimizer.lr, trainer.max_epochs" in text
    spent = re.search(r"^- compute: ([\d,]+) image-epochs spent \(([\d.]+) of", text, re.M)
    assert spent and float(spent.group(2)) < 1
    effects = pd.read_csv(out / "effects.csv").set_index("term")
    assert effects.loc["optimizer.lr", "verdict"] == "hurt"
    assert "optimizer.weight_decay" not in effects.index  # no verdict from the screen

    parent = client.search_runs(
        [client.get_experiment_by_name("hc18_synthetic").experiment_id],
        f"tags.`{tags.ROLE}` = 'blame'",
    )[0]
    kids = tracking.children(client, parent)
    fidelity = pd.Series([k.data.tags.get(tags.FIDELITY) for k in kids]).value_counts()
    # 4 cells x 2 seeds; lr at 2 levels x 4 seeds at 10 epochs (2 seeds: 1 dof between runs),
    # B one of them
    assert fidelity.to_dict() == {"screen": 8, "full": 7}
    assert "4 seeds a cell (not 2)" in text
    screened = [k for k in kids if k.data.tags[tags.FIDELITY] == "screen"]
    assert {k.data.params["trainer.max_epochs"] for k in screened} == {"4"}
    assert all(k.info.run_name.startswith("screen ") for k in screened)
    # each cell's Lightning output is its run's cell.log, not the blame's terminal
    assert "cell.log" in {a.path for a in client.list_artifacts(kids[0].info.run_id)}
    assert "Epoch" not in text and "GPU available" not in text

    again = run_segexp(*args[:-2], "--out", str(work_dir / "again"), work_dir=work_dir)
    assert again.returncode == 0 and "trainings: 0 now" in again.stdout  # every cell reused

    rank = run_segexp(
        "fidelity", parent.info.run_id, "--out", str(work_dir / "f"), work_dir=work_dir
    )
    assert rank.returncode == 0, rank.stderr[-2000:]
    table = pd.read_csv(work_dir / "f" / "fidelity.csv")
    assert list(table.epochs) == list(range(1, 11)) and "gap_b_minus_a" in table
    assert "A-vs-B gap at the end" in rank.stdout
