"""Data layer: both layouts, synthetic generators, splits, input checks, cache."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SHARED_HC18, make_cfg, shared_hc18_count
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from PIL import Image
from skimage import draw
from torch.utils.data import RandomSampler

from segexp import cli
from segexp.data import (
    DataError,
    Rows,
    SegDataModule,
    cache_entry,
    filled_mask,
    load_arrays,
    scan_hc18,
    scan_lgg,
    scan_listed,
    split_groups,
)
from segexp.evaluation import ramanujan_perimeter
from segexp.files import atomic_folder, atomic_path, atomic_write_bytes, atomic_write_text


def datamodule(root, layout="hc18", **kwargs) -> SegDataModule:
    defaults = {
        "hc18": dict(channels=1, val_fraction=0.25),
        "lgg": dict(channels=3, val_count=1, normalize="volume"),
    }
    args = dict(
        name=f"{layout}_synthetic", layout=layout, root=str(root), image_size=32, batch_size=4
    )
    return SegDataModule(**{**args, **defaults[layout], **kwargs})


def copy_root(src, tmp_path):
    return shutil.copytree(src, tmp_path / src.name)


# ---------------------------------------------------------------- synthetic data, both layouts


def test_synthetic_hc18_has_official_layout_and_exact_hc(hc18_root):
    table = pd.read_csv(hc18_root / "training_set_pixel_size_and_HC.csv")
    assert list(table.columns) == ["filename", "pixel size(mm)", "head circumference (mm)"]
    assert len(table) == 24 and table["pixel size(mm)"].between(0.052, 0.326).all()
    assert any("_2HC" in f for f in table.filename), "exams with repeats, as in HC18"
    image = np.asarray(Image.open(hc18_root / "training_set" / table.filename[0]))
    annotation = np.asarray(
        Image.open(
            hc18_root / "training_set" / table.filename[0].replace(".png", "_Annotation.png")
        )
    )
    assert image.shape == annotation.shape == (540, 800)
    assert set(np.unique(annotation)) == {0, 255}
    assert (annotation > 0).mean() < 0.01, "a 1-pixel outline, like the official release"
    assert (
        len(pd.read_csv(hc18_root / "test_set_pixel_size.csv"))
        == len(list((hc18_root / "test_set").glob("*.png")))
        == 3
    )


def test_ramanujan_perimeter_matches_known_values():
    assert ramanujan_perimeter(10, 10) == pytest.approx(2 * np.pi * 10)
    # numerically integrated perimeter of a 3:1 ellipse
    t = np.linspace(0, 2 * np.pi, 200001)
    exact = np.sum(np.hypot(np.diff(3 * np.cos(t)), np.diff(np.sin(t))))
    assert ramanujan_perimeter(3, 1) == pytest.approx(exact, rel=1e-6)


def test_synthetic_lgg_has_kaggle_layout_with_3d_lesions_and_empty_slices(lgg_root):
    patients = sorted(p for p in lgg_root.iterdir() if p.is_dir())
    assert len(patients) == 4 and (lgg_root / "data.csv").is_file()
    for patient in patients:
        masks = sorted(patient.glob("*_mask.tif"), key=lambda p: int(p.stem.split("_")[-2]))
        assert 20 <= len(masks) <= 24
        image = np.asarray(Image.open(patient / f"{patient.name}_1.tif"))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        positive = [bool(np.asarray(Image.open(m)).any()) for m in masks]
        assert 0 < sum(positive) < len(positive), "a lesion on some slices, empty masks on others"
        first, last = positive.index(True), len(positive) - 1 - positive[::-1].index(True)
        assert all(positive[first : last + 1]), "the lesion spans consecutive slices"


# ---------------------------------------------------------------- HC18 loader


def test_hc18_cases_know_exam_pixel_size_and_hc(hc18_root):
    cases = scan_hc18(hc18_root)
    assert len(cases) == 24
    repeat = next(c for c in cases if "_2HC" in c.case_id)
    assert repeat.group == repeat.case_id.split("_")[0]
    table = pd.read_csv(hc18_root / "training_set_pixel_size_and_HC.csv").set_index("filename")
    assert repeat.pixel_size_mm == pytest.approx(
        table.loc[f"{repeat.case_id}.png", "pixel size(mm)"]
    )
    assert repeat.hc_mm == pytest.approx(
        table.loc[f"{repeat.case_id}.png", "head circumference (mm)"]
    )
    dm = datamodule(hc18_root)
    dm.prepare_data()
    assert dm.original_sizes.tolist() == [[540, 800]] * 24


def test_outline_and_filled_annotations_give_the_same_mask():
    outline = np.zeros((540, 800), np.uint8)
    rr, cc = draw.ellipse_perimeter(270, 400, 120, 200, 0.4, shape=outline.shape)
    outline[rr, cc] = 255
    filled = np.zeros_like(outline)
    rr, cc = draw.ellipse(270, 400, 120, 200, shape=outline.shape, rotation=-0.4)  # same ellipse
    filled[rr, cc] = 255
    rgb_filled = np.stack([filled] * 3, axis=-1).max(axis=2)  # as the RGB copy in ../shared
    a, b = filled_mask(outline), filled_mask(rgb_filled)
    assert (a & b).sum() / (a | b).sum() > 0.98
    # an outline cut by the image border does not close: the ellipse is fitted and filled
    cut = np.zeros_like(outline)
    rr, cc = draw.ellipse_perimeter(100, 400, 150, 200, 0.0, shape=cut.shape)
    cut[rr, cc] = 255
    area = filled_mask(cut).sum()
    rr, cc = draw.ellipse(100, 400, 150, 200, shape=cut.shape)
    assert abs(area - len(rr)) / len(rr) < 0.03


def test_hc18_split_is_by_exam_and_stable_under_listing_order(hc18_root):
    cases = scan_hc18(hc18_root)
    val = split_groups(cases, 0.25, None, seed=3)
    shuffled = cases[:]
    random.Random(0).shuffle(shuffled)
    assert split_groups(shuffled, 0.25, None, seed=3) == val
    assert split_groups(cases, 0.25, None, seed=4) != val
    dm = datamodule(hc18_root, split_seed=3)
    dm.setup()
    train_exams = {dm.cases[i].group for i in dm.train_idx}
    val_exams = {dm.cases[i].group for i in dm.val_idx}
    assert val_exams == val and not train_exams & val_exams
    split = dm.split_table()
    assert split.groupby("group").split.nunique().max() == 1


def test_batches_follow_the_contract(hc18_root, lgg_root):
    for dm in (datamodule(hc18_root), datamodule(lgg_root, "lgg")):
        dm.setup()
        batch = next(iter(dm.train_dataloader()))
        channels = 1 if dm.layout == "hc18" else 3
        assert (
            batch["image"].shape == (4, channels, 32, 32) and batch["image"].dtype.is_floating_point
        )
        assert batch["mask"].shape == (4, 1, 32, 32)
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
        assert len(batch["case_id"]) == len(batch["group"]) == 4
    # per-volume z-score: each patient's channels come out near zero mean, unit spread
    images = torch_cat(dm.val_dataloader())
    assert abs(images.mean()) < 0.5 and 0.5 < images.std() < 1.5


def torch_cat(loader):
    import torch

    return torch.cat([b["image"] for b in loader])


def test_unannotated_hc18_test_set_loads_preprocessed_as_the_dataset(hc18_root):
    dm = datamodule(hc18_root)
    dm.setup()
    batch = next(iter(dm.loader_of(scan_hc18(hc18_root, "test"))))
    assert (
        "mask" not in batch
        and batch["image"].shape[1:] == (1, 32, 32)
        and len(batch["case_id"]) == 3
    )


# ---------------------------------------------------------------- LGG loader


def test_lgg_slices_are_in_numeric_order_and_patients_never_straddle(lgg_root, tmp_path):
    cases = scan_lgg(lgg_root)
    for patient in {c.group for c in cases}:
        indices = [c.slice_index for c in cases if c.group == patient]
        assert indices == list(range(1, len(indices) + 1))
    # the download folder that contains kaggle_3m/ is accepted as root too
    parent = tmp_path / "lgg-mri-segmentation"
    parent.mkdir()
    os.symlink(lgg_root, parent / "kaggle_3m")
    assert len(scan_lgg(parent)) == len(cases)
    dm = datamodule(lgg_root, "lgg", val_count=2)
    dm.setup()
    val_patients = {dm.cases[i].group for i in dm.val_idx}
    assert len(val_patients) == 2
    assert not val_patients & {dm.cases[i].group for i in dm.train_idx}
    assert {"patients", "empty_mask_fraction"} <= set(dm.summary())
    assert 0 < dm.summary()["empty_mask_fraction"] < 1


# ---------------------------------------------------------------- bad input


def break_hc18(kind: str, root):
    training = root / "training_set"
    if kind == "missing annotation":
        (training / "000_HC_Annotation.png").unlink()
        return "000_HC.png", "missing annotation"
    if kind == "image without CSV row":
        shutil.copy(training / "000_HC.png", training / "999_HC.png")
        shutil.copy(training / "000_HC_Annotation.png", training / "999_HC_Annotation.png")
        return "999_HC.png", "no row in"
    if kind == "CSV row without image":
        (training / "001_HC.png").unlink()
        (training / "001_HC_Annotation.png").unlink()
        return "001_HC.png", "no such image"
    if kind == "corrupt image":
        data = (training / "002_HC.png").read_bytes()
        (training / "002_HC.png").write_bytes(data[: len(data) // 3])
        return "002_HC.png", "corrupt"
    if kind == "mask size mismatch":
        Image.fromarray(np.zeros((100, 100), np.uint8)).save(training / "003_HC_Annotation.png")
        return "003_HC_Annotation.png", "mask size"
    if kind == "non-binary mask":
        Image.fromarray(np.arange(540 * 800).reshape(540, 800).astype(np.uint8)).save(
            training / "004_HC_Annotation.png"
        )
        return "004_HC_Annotation.png", "non-binary"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "missing annotation",
        "image without CSV row",
        "CSV row without image",
        "corrupt image",
        "mask size mismatch",
        "non-binary mask",
    ],
)
def test_each_bad_input_is_named_with_its_file(kind, hc18_root, tmp_path):
    root = copy_root(hc18_root, tmp_path)
    filename, reason = break_hc18(kind, root)
    with pytest.raises(DataError) as err:
        datamodule(root).prepare_data()
    assert filename in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "missing CSV"),
        ('"a\n', "unreadable CSV"),
        ("filename\n000_HC.png\n", "missing column(s) ['pixel size(mm)']"),
    ],
)
def test_a_bad_pixel_size_csv_is_named_by_the_dataset_and_by_predict(
    content, reason, hc18_root, tmp_path
):
    root = copy_root(hc18_root, tmp_path)
    csv = root / "test_set_pixel_size.csv"
    if content is None:
        csv.unlink()
    else:
        csv.write_text(content)
    for scan in (lambda: scan_hc18(root, "test"), lambda: scan_listed(root / "test_set", csv)):
        with pytest.raises(DataError) as err:
            scan()
        assert csv.name in str(err.value) and reason in str(err.value)


def test_every_offending_file_is_listed_in_one_error(hc18_root, tmp_path):
    root = copy_root(hc18_root, tmp_path)
    for kind in ("corrupt image", "mask size mismatch", "non-binary mask"):
        break_hc18(kind, root)
    with pytest.raises(DataError) as err:
        datamodule(root).prepare_data()
    assert len(err.value.problems) == 3
    for name in ("002_HC.png", "003_HC_Annotation.png", "004_HC_Annotation.png"):
        assert name in str(err.value)


def test_empty_or_wrong_root_is_a_clear_error(tmp_path, lgg_root):
    with pytest.raises(DataError, match="does not exist"):
        datamodule(tmp_path / "nope").prepare_data()
    with pytest.raises(DataError, match="missing folder"):
        datamodule(tmp_path).prepare_data()
    with pytest.raises(DataError, match="missing folder"):
        datamodule(lgg_root).prepare_data()  # an LGG root given as HC18
    with pytest.raises(DataError, match="no patient folders"):
        datamodule(tmp_path, "lgg").prepare_data()


def test_lgg_missing_mask_is_named(lgg_root, tmp_path):
    root = copy_root(lgg_root, tmp_path)
    patient = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (patient / f"{patient.name}_3_mask.tif").unlink()
    with pytest.raises(DataError, match=f"{patient.name}_3.tif: missing mask"):
        scan_lgg(root)


def test_check_data_prints_summary_or_fails_with_the_file(hc18_root, tmp_path, capsys):
    overrides = [
        "dataset=hc18",
        f"dataset.root={hc18_root}",
        f"work_dir={tmp_path}",
        "dataset.image_size=32",
    ]
    assert cli.main(["check-data", *overrides]) == 0
    assert '"images": 24' in capsys.readouterr().out
    root = copy_root(hc18_root, tmp_path)
    break_hc18("corrupt image", root)
    assert (
        cli.main(["check-data", "dataset=hc18", f"dataset.root={root}", f"work_dir={tmp_path}"])
        == 2
    )
    assert "002_HC.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, key",
    [
        ("dataset.image_size=30", "dataset.image_size"),
        ("dataset.batch_size=0", "dataset.batch_size"),
        ("dataset.val_fraction=1.5", "dataset.val_fraction"),
        ("dataset.normalize=zscore", "dataset.normalize"),
        ("dataset.oversample_factor=3", "dataset.oversample_factor"),
        ("dataset.oversample_factor=0.5", "dataset.oversample_factor"),
    ],
)
def test_bad_dataset_values_name_their_key(override, key, hc18_root, tmp_path):
    cfg = make_cfg(tmp_path, f"dataset.root={hc18_root}", override)
    with pytest.raises((ValueError, InstantiationException), match=key):
        instantiate(cfg.dataset).setup()


def test_oversampling_draws_large_heads_as_often_as_asked(hc18_root):
    dm = datamodule(hc18_root, oversample_hc_mm=0.0, oversample_factor=4.0)
    dm.setup()
    hc = sorted(dm.cases[i].hc_mm for i in dm.train_idx)
    threshold = hc[len(hc) // 2]  # the upper half of the training heads are "large"
    dm.oversample = (threshold, 4.0)
    large = sum(h >= threshold for h in hc) / len(hc)
    torch.manual_seed(0)
    drawn = [h for _ in range(60) for b in dm.train_dataloader() for h in b["hc_mm"].tolist()]
    share = np.mean(np.array(drawn) >= threshold)
    expected = 4 * large / (4 * large + 1 - large)
    assert abs(share - expected) < 0.05, (share, expected, large)
    assert len(drawn) == 60 * (len(hc) // dm.batch_size) * dm.batch_size  # epoch length kept
    plain = datamodule(hc18_root)
    plain.setup()
    assert plain.train_weights() is None
    assert isinstance(plain.train_dataloader().sampler, RandomSampler)


def test_oversampling_needs_head_sizes(lgg_root):
    with pytest.raises(ValueError, match="dataset.oversample_hc_mm"):
        datamodule(lgg_root, "lgg", oversample_hc_mm=200.0, oversample_factor=2.0)


# ---------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(hc18_root, tmp_path):
    root = copy_root(hc18_root, tmp_path)
    cache = tmp_path / "cache"
    cases = scan_hc18(root)

    def load(cases, size):
        return load_arrays(cases, size, 1, cache_entry(cases, size, 1, cache))

    start = time.perf_counter()
    images, masks, _ = load(cases, 32)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    images2, masks2, _ = load(scan_hc18(root), 32)
    warm = time.perf_counter() - start
    assert len(list(cache.iterdir())) == 1 and warm < cold
    np.testing.assert_array_equal(images, images2)
    np.testing.assert_array_equal(masks, masks2)
    # another size is another entry; a changed file invalidates
    load(cases, 64)
    assert len(list(cache.iterdir())) == 2
    path = root / "training_set" / "000_HC.png"
    image = np.asarray(Image.open(path)).copy()
    image[:10] = 255
    Image.fromarray(image).save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed, _, _ = load(scan_hc18(root), 32)
    assert len(list(cache.iterdir())) == 3
    assert not np.array_equal(changed[0], images[0])


def test_an_atomic_write_leaves_the_old_file_or_the_new_one_and_no_temporary(tmp_path):
    path = tmp_path / "speed" / "entry.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["entry.json"]
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["entry.json"]


def test_a_cache_folder_another_writer_finished_first_is_kept(tmp_path):
    entry = tmp_path / "cache" / "key"
    for content in ("first", "second"):
        with atomic_folder(entry) as tmp:
            (tmp / "meta.json").write_text(content)
    assert (entry / "meta.json").read_text() == "first"
    assert os.listdir(entry.parent) == ["key"]


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("augment", ["none", "buda", "strong"])
def test_augment_presets_keep_masks_binary(augment, hc18_root, tmp_path):
    cfg = make_cfg(tmp_path, f"augment={augment}")
    dm = datamodule(hc18_root, train_transform=instantiate(cfg.augment) if cfg.augment else None)
    dm.setup()
    for batch in dm.train_dataloader():
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    if augment == "buda":
        assert list(cfg.augment.transforms[0].scale) == [0.95, 1.05]
        assert list(cfg.augment.transforms[0].rotate) == [-15, 15]


# ---------------------------------------------------------------- the real HC18 data


@pytest.mark.skipif(not SHARED_HC18.is_dir(), reason=f"real HC18 data not found at {SHARED_HC18}")
def test_real_hc18_loads_and_no_exam_straddles_the_split(tmp_path):
    dm = SegDataModule(
        "hc18", "hc18", str(SHARED_HC18), channels=1, image_size=32, cache_dir=str(tmp_path)
    )
    dm.setup()
    n = shared_hc18_count()
    assert len(dm.cases) == n
    assert len(dm.train_idx) + len(dm.val_idx) == n
    assert not {dm.cases[i].group for i in dm.train_idx} & {dm.cases[i].group for i in dm.val_idx}
    assert 0.15 < len(dm.val_idx) / n < 0.25
    masks = np.asarray(dm.masks)
    assert masks.max() == 1 and 0.05 < masks.mean() < 0.6  # filled heads
    assert len(scan_hc18(SHARED_HC18, "test")) == 40


def test_volume_stats_from_histograms_equal_numpy_percentiles():
    from segexp.data import volume_stats

    rng = np.random.default_rng(0)
    images = rng.gamma(2, 30, size=(40, 32, 32, 3)).clip(0, 255).astype(np.uint8)
    images[:4] = 0  # an all-black start of a volume, as LGG volumes have
    groups = ["p1"] * 15 + ["p2"] * 20 + ["p3"] * 5
    stats = volume_stats(images, groups)
    for group in set(groups):
        idx = [i for i, g in enumerate(groups) if g == group]
        volume = images[idx].reshape(-1, 3).astype(np.float64)
        low, high = np.percentile(volume, 10, axis=0), np.percentile(volume, 99, axis=0)
        clipped = np.clip(volume, low, high)
        expected = np.stack([low, high, clipped.mean(0), clipped.std(0) + 1e-6])
        assert np.allclose(stats[idx[0]], expected, atol=1e-4), group
        assert (stats[idx] == stats[idx[0]]).all()


def test_16_bit_images_are_scaled_by_bit_depth_not_clipped(tmp_path):
    from segexp.data import read_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")  # really a 16-bit file
    for mode in ("L", "RGB"):
        image = read_image(str(tmp_path / "16bit.png"), mode)
        assert image.dtype == np.uint8 and image.shape[:2] == (64, 64)
        gray = image if mode == "L" else image[..., 0]
        assert np.abs(gray.astype(float) - ramp / 257).max() <= 0.5
        assert (gray == 255).mean() < 0.01  # clipping made 94% of such pixels 255


def test_a_1x1_image_is_named(hc18_root, tmp_path):
    root = tmp_path / "hc18"
    shutil.copytree(hc18_root, root)
    victim = sorted((root / "training_set").glob("*HC.png"))[0]
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(victim)
    with pytest.raises(DataError, match=rf"{victim.name}: image is 1x1 px"):
        SegDataModule("hc18", "hc18", str(root), channels=1, image_size=32).prepare_data()


def rss_file_mb() -> float:
    """File-backed resident memory of this process (mapped files count here)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status (not Linux)")


def test_cached_rows_are_read_not_mapped_so_an_epoch_adds_no_resident_memory(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (160, 256, 256, 3), dtype=np.uint8)
    path = tmp_path / "images.npy"
    np.save(path, array)  # 30 MB, now in the page cache
    rows = Rows(path)
    assert len(rows) == 160 and rows.shape == array.shape and rows.dtype == np.uint8
    start = rss_file_mb()
    for k in range(len(rows)):
        np.testing.assert_array_equal(rows[k], array[k])
    grown = rss_file_mb() - start
    np.testing.assert_array_equal(rows[[3, -1]], array[[3, -1]])
    np.testing.assert_array_equal(np.asarray(rows), array)
    assert rows[5].flags.writeable
    with pytest.raises(IndexError, match="row 160 of 160"):
        rows[160]
    # the same epoch through a memory map keeps every page resident: the measurement can tell
    mapped, start = np.load(path, mmap_mode="r"), rss_file_mb()
    for k in range(len(mapped)):
        np.asarray(mapped[k]).sum()
    assert rss_file_mb() - start > 25
    assert grown < 5, f"reading every row kept {grown:.0f} MB resident"
    # a DataLoader worker gets a copy that opens its own file
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(rows))[7], array[7])
    assert rows[[]].shape == (0, 256, 256, 3)
    with open(path, "r+b") as f:  # a cache cut short (a full disk) is named, not half-read
        f.truncate(path.stat().st_size - 1000)
    with pytest.raises(DataError, match="images.npy.*truncated"):
        rows[159]


def test_a_fresh_cache_serves_rows_from_its_file_not_the_decoded_arrays(hc18_root, tmp_path):
    cases = scan_hc18(hc18_root)
    images, masks, _ = load_arrays(cases, 32, 1, cache_entry(cases, 32, 1, tmp_path / "cache"))
    assert isinstance(images, Rows) and isinstance(masks, Rows)
    assert images.path.parent.parent == tmp_path / "cache"
    in_memory, memory_masks, _ = load_arrays(cases, 32, 1, None)
    assert isinstance(in_memory, np.ndarray)
    np.testing.assert_array_equal(np.asarray(images), in_memory)
    np.testing.assert_array_equal(np.asarray(masks), memory_masks)


def test_the_same_files_by_a_relative_or_an_absolute_root_are_the_same_data(hc18_root, monkeypatch):
    from segexp.data.cases import SCANNERS, fingerprint

    absolute = fingerprint(SCANNERS["hc18"](hc18_root))
    monkeypatch.chdir(hc18_root.parent)
    assert fingerprint(SCANNERS["hc18"](Path(hc18_root.name))) == absolute
