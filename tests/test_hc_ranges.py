"""HC accuracy per head-size range: the ranges, their metrics on known errors, the CSVs and text
table a run writes, and `segexp predict`'s range column and flag."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segexp import report
from segexp.evaluation import (
    Ellipse,
    ellipse_mask,
    hc_mae_interval,
    hc_range_report,
    hc_range_table,
    head_size_range,
    measure_hc,
    ramanujan_perimeter,
    range_names,
    summarize,
)
from segexp.evaluation.hc import HeadMeasure
from segexp.predict import flag_table

# exams of small heads only, as a model trained on HC18's ids 000-599 knows them
SMALL_HEADS = {"hc_plausible": {"hc_mm": (44.0, 199.0), "eccentricity": (0.5, 0.9)}}


def known_cases() -> pd.DataFrame:
    """Six validation images with known HC errors and no head of 200-300 mm."""
    hc_true = [80.0, 90.0, 150.0, 199.9, 100.0, 320.0]
    errors = [1.0, -3.0, 12.0, -2.0, 2.0, -11.0]
    return pd.DataFrame(
        {
            "case_id": [f"{i:03d}_HC" for i in range(6)],
            "dice": 1.0,
            "iou": 1.0,
            "accuracy": 1.0,
            "hc_true_mm": hc_true,
            "hc_range": range_names(hc_true),
            "hc_error_mm": errors,
            "hc_abs_error_mm": np.abs(errors),
            "hc_flag": [False, False, True, False, False, True],
            "pixel_size_mm": [0.1, 0.1, 0.2, 0.2, 0.1, 0.25],
        }
    )


def test_head_size_ranges_hold_their_lower_edge_and_no_head_has_none():
    hc = [44.0, 99.9, 100.0, 199.9, 200.0, 300.0, 335.0]
    assert range_names(hc) == ["lt100", "lt100", "100_200", "100_200", "200_300", "gt300", "gt300"]
    assert head_size_range(0.0) is None and head_size_range(float("nan")) is None
    assert [head_size_range(h).label for h in (50, 150, 250, 350)] == [
        "< 100 mm",
        "100-200 mm",
        "200-300 mm",
        "> 300 mm",
    ]


def test_hc_metrics_per_head_size_range_on_known_errors():
    cases = known_cases()
    metrics = summarize(cases, volumetric=False)
    expected = {
        "lt100": (2.0, -1.0, 0.0),
        "100_200": (16 / 3, 4.0, 1.0),
        "gt300": (11.0, -11.0, 1.0),
    }
    for name, (mae, bias, outliers) in expected.items():
        assert metrics[f"val/hc_mae_mm_{name}"] == pytest.approx(mae)
        assert metrics[f"val/hc_bias_mm_{name}"] == pytest.approx(bias)
        assert metrics[f"val/hc_outliers_10mm_{name}"] == outliers
    assert not [k for k in metrics if k.endswith("200_300")]  # no images: no metric, no nan
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["val/hc_mae_mm"] == pytest.approx(31 / 6)
    assert metrics["val/hc_bias_mm"] == pytest.approx(-1 / 6)
    assert metrics["val/hc_outliers_10mm"] == 2.0 and metrics["val/hc_flagged"] == 2.0
    table = hc_range_table(cases.sample(frac=1, random_state=0))  # any row order
    assert table.hc_range.tolist() == ["lt100", "100_200", "gt300"]
    assert table.images.tolist() == [2, 3, 1] and table.hc_flagged.tolist() == [0, 1, 1]
    # |error| / HC in %, and / pixel size: the original image's pixels
    pct = [(1 / 80 + 3 / 90) / 2, (12 / 150 + 2 / 199.9 + 2 / 100) / 3, 11 / 320]
    assert table.hc_mae_pct.tolist() == pytest.approx([100 * p for p in pct])
    assert table.hc_mae_px.tolist() == pytest.approx([20.0, 30.0, 44.0])


def test_every_range_logs_a_last_value_beside_its_best():
    assert {f"val/hc_mae_mm_{n}" for n in ("lt100", "100_200", "200_300", "gt300")} <= set(
        report.LAST_KEYS
    )


class Artifacts:
    """The `log_artifact` of a TrackedRun, recorded."""

    def __init__(self):
        self.logged: list[tuple[str, str]] = []

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        self.logged.append((Path(path).name, artifact_path))


@pytest.mark.parametrize("split", ["val", "test"])
def test_each_split_writes_its_cases_and_head_size_ranges(split, tmp_path):
    run = Artifacts()
    report.log_cases(run, known_cases(), tmp_path, split)
    assert run.logged == [
        (f"{split}_cases.csv", "evaluation"),
        (f"{split}_hc_ranges.csv", "evaluation"),
    ]
    cases = pd.read_csv(tmp_path / f"{split}_cases.csv")
    assert cases.filename[0] == "000_HC.png" and cases.hc_range.tolist() == range_names(
        cases.hc_true_mm
    )
    ranges = pd.read_csv(tmp_path / f"{split}_hc_ranges.csv")
    assert ranges.hc_range.tolist() == ["lt100", "100_200", "gt300"]
    assert ranges.hc_mae_mm.tolist() == pytest.approx([2.0, 16 / 3, 11.0])


def test_lgg_cases_have_no_head_size_ranges(tmp_path):
    run = Artifacts()
    report.log_cases(run, pd.DataFrame({"case_id": ["p1_s3"], "dice": [0.5]}), tmp_path, "val")
    assert run.logged == [("val_cases.csv", "evaluation")]


def test_range_report_prints_each_range_with_images_then_all():
    lines = hc_range_report(known_cases()).splitlines()
    assert lines[0].split() == [
        "head",
        "size",
        "images",
        "MAE",
        "mm",
        "95%",
        "CI",
        "bias",
        "mm",
        ">",
        "10",
        "mm",
        "flagged",
        "MAE",
        "%",
        "MAE",
        "px",
    ]
    rows = [line.rsplit(None, 8) for line in lines[1:]]
    assert [row[0].strip() for row in rows] == ["< 100 mm", "100-200 mm", "> 300 mm", "all"]
    assert rows[1][1:] == ["3", "5.33", "0.00-19.68", "+4.00", "1", "1", "3.67", "30.0"]
    assert rows[3][1:] == ["6", "5.17", "0.00-10.37", "-0.17", "2", "2", "3.17", "29.0"]


def test_predict_flags_name_the_head_size_range_of_a_head_outside_the_training_range():
    head, nan = Ellipse(400, 270, 150, 100, 0.0), float("nan")
    measured = [
        HeadMeasure(150.0, 0.7, 5.0, head),
        HeadMeasure(250.0, 0.7, 5.0, head),
        HeadMeasure(320.0, 0.7, 12.0, head),
        HeadMeasure(0.0, nan, nan, None),
    ]
    evaluation = {**SMALL_HEADS, "hc_width_limit_px": 10.0}  # as the run's checkpoint carries it
    flags = flag_table(["a.png", "b.png", "c.png", "d.png"], measured, evaluation)
    assert flags.hc_range[:3].tolist() == ["100_200", "200_300", "gt300"]
    assert pd.isna(flags.hc_range[3])  # no head, no size: an empty cell in the CSV
    assert flags.hc_flag.tolist() == [False, True, True, True]
    assert flags.hc_flag_reason.tolist() == [
        "",
        "HC 250 mm (200-300 mm heads) outside the training range 44-199 mm",
        "HC 320 mm (> 300 mm heads) outside the training range 44-199 mm; "
        "boundary 12.0 px wide, over the limit 10.0 px",
        "no head found",
    ]


def test_a_planted_large_head_is_measured_sized_and_flagged():
    original, pixel_mm = (540, 800), 0.25
    # a confident prediction at the model's 128 px of a head 480x320 px at 800x540: 317 mm
    semi = (240 * 128 / 800, 160 * 128 / 540)
    probability = ellipse_mask(Ellipse(64, 64, *semi, 0.0), (128, 128)).astype(np.float32)
    head = measure_hc(probability, original, pixel_mm)
    assert head.hc_mm == pytest.approx(ramanujan_perimeter(240, 160) * pixel_mm, rel=0.02)
    flags = flag_table(["big.png"], [head], {**SMALL_HEADS, "hc_width_limit_px": 1e6})
    assert flags.hc_range.tolist() == ["gt300"] and flags.hc_flag.tolist() == [True]
    assert (
        f"HC {head.hc_mm:.0f} mm (> 300 mm heads) outside the training range 44-199 mm"
        == (flags.hc_flag_reason[0])
    )


def planted_mae_tables(rng, exams: int, per_exam: int, exam_sd: float, image_sd: float):
    """Tables of HC errors bias 1 mm + an exam's shared error + an image's own, and their MAE."""
    sd = math.hypot(exam_sd, image_sd)
    # E|e| for e ~ N(1, sd^2)
    mae = sd * math.sqrt(2 / math.pi) * math.exp(-1 / (2 * sd**2)) + math.erf(1 / (sd * 2**0.5))
    group = np.repeat(np.arange(exams), per_exam)
    for _ in range(1000):
        errors = 1.0 + rng.normal(0, exam_sd, exams)[group] + rng.normal(0, image_sd, len(group))
        yield pd.DataFrame({"hc_error_mm": errors, "group": group.astype(str)}), mae


@pytest.mark.parametrize(
    "exams, per_exam, exam_sd, image_sd, least",
    [
        (8, 2, 2.0, 1.0, 0.87),  # a large-head range: ~15 images of ~8 exams
        (10, 3, 2.0, 0.5, 0.87),  # images of one exam err alike: per image it would cover ~0.75
        (40, 1, 0.0, 2.0, 0.93),  # many independent images: close to the nominal 0.95
    ],
)
def test_the_mae_interval_covers_the_planted_mae(exams, per_exam, exam_sd, image_sd, least):
    rng = np.random.default_rng(exams)
    covered = []
    for table, mae in planted_mae_tables(rng, exams, per_exam, exam_sd, image_sd):
        interval = hc_mae_interval(table)
        covered.append(interval["hc_mae_lo_mm"] <= mae <= interval["hc_mae_hi_mm"])
    assert least <= np.mean(covered) <= 0.985


def test_the_mae_interval_needs_three_exams_and_the_report_prints_it():
    table = hc_range_table(known_cases())  # no exam column: each image its own exam
    assert np.isnan(table.hc_mae_lo_mm[0]) and np.isnan(table.hc_mae_hi_mm[0])  # 2 images
    # 100-200 mm: |errors| 12, 2, 2; se = sd / sqrt(3), t(2) = 4.303; below 0 is cut at 0
    half = 4.302653 * np.std([12, 2, 2], ddof=1) / math.sqrt(3)
    assert table.hc_mae_lo_mm[1] == 0.0
    assert table.hc_mae_hi_mm[1] == pytest.approx(16 / 3 + half, rel=1e-5)
    rows = hc_range_report(known_cases()).splitlines()
    assert rows[1].split()[5] == "-" and rows[2].split()[4] == f"0.00-{16 / 3 + half:.2f}"
