"""Hostile files a store or a dataset may hold: each refused in one line naming the file."""

from __future__ import annotations

import io
import re
import shutil
import time
import zipfile

import numpy as np
import pytest
import torch
import yaml
from helpers import no_runs, planted_run, predict_args, tiny
from PIL import Image

from segexp import config
from segexp.config import ConfigError
from segexp.data import DataError
from segexp.models import CheckpointError, load_checkpoint
from segexp.train import train


def check_data(root, work_dir) -> list[str]:
    """`segexp check-data` of the HC18 set at `root`."""
    return ["check-data", "dataset=hc18", f"dataset.root={root}", f"work_dir={work_dir}"]


def test_a_file_on_two_csv_rows_is_named_and_trains_nothing(
    hc18_root, work_dir, client, tmp_path, capsys
):
    """Looked up by filename, the last of two rows would win without a word."""
    from segexp import cli

    root = shutil.copytree(hc18_root, tmp_path / "dup")
    with open(root / "training_set_pixel_size_and_HC.csv", "a") as f:
        f.write("000_HC.png,0.1,150.0\n")  # line 26: 24 rows after the header
    assert cli.main(check_data(root, work_dir)) == 2
    assert "000_HC.png is listed on more than one row (lines 2, 26)" in capsys.readouterr().err
    with pytest.raises(DataError, match="000_HC.png is listed on more than one row"):
        train(tiny(work_dir, root))
    assert no_runs(client)


def test_an_alpha_only_or_empty_annotation_is_named_before_any_run(
    hc18_root, work_dir, client, tmp_path, capsys
):
    from segexp import cli

    root = shutil.copytree(hc18_root, tmp_path / "masks")
    training = root / "training_set"
    ellipse = np.asarray(Image.open(training / "000_HC_Annotation.png").convert("L"))
    rgba = np.zeros((*ellipse.shape, 4), np.uint8)
    rgba[..., 3] = ellipse  # drawn in the alpha channel, the colours all black
    Image.fromarray(rgba, "RGBA").save(training / "000_HC_Annotation.png")
    Image.fromarray(np.zeros_like(ellipse)).save(training / "001_HC_Annotation.png")
    assert cli.main(check_data(root, work_dir)) == 2
    err = capsys.readouterr().err
    assert "000_HC_Annotation.png: annotation drawn in its alpha channel only" in err
    assert "001_HC_Annotation.png: empty annotation, but its CSV row gives HC" in err
    with pytest.raises(DataError, match="alpha channel only"):
        train(tiny(work_dir, root))
    assert no_runs(client)


def billion_laughs(levels: int = 9) -> bytes:
    """A YAML mapping of 10^levels values written in under 1 KB, by aliases of aliases."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    ("content", "bound"),
    [
        (billion_laughs(), "expands beyond 20000 values"),
        (b"a: [" + b"1, " * (1 << 19) + b"]\n", "is over 1048576 bytes"),
        (
            b"a:" + b"".join(b"\n" + b"  " * d + b"- " for d in range(1, 40)) + b"x\n",
            "expands beyond depth 32",
        ),
    ],
)
def test_a_stored_config_beyond_its_bounds_is_refused_at_once(client, work_dir, content, bound):
    """Every walk of a billion laughs would expand it: 10^9 values, minutes and gigabytes."""
    from segexp import tracking

    run_id = planted_run(client, work_dir, {"config.yaml": content})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"run {run_id}: config.yaml {bound}"):
        tracking.stored_config(client, run_id)
    assert time.monotonic() - started < 1.5


def checkpoint_file(state: dict, legacy=False, deflate=False, extra: dict | None = None) -> bytes:
    """`torch.save(state)`'s bytes: the pre-zip format, or its zip entries deflated, `extra` added."""
    saved = io.BytesIO()
    torch.save(state, saved, _use_new_zipfile_serialization=not legacy)
    if legacy or not (deflate or extra):
        return saved.getvalue()
    source, out = zipfile.ZipFile(saved), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        for entry in source.infolist():
            z.writestr(entry.filename, source.read(entry.filename))
        for name, content in (extra or {}).items():
            z.writestr(name, content)
    return out.getvalue()


def hostile_checkpoints() -> dict[str, tuple[bytes, str]]:
    """{case: (file, what the refusal says)}; the bomb inflates ~1000x (16 MiB of zeros here)."""
    state = {"epoch": 0, "state_dict": {"net.w": torch.zeros(8)}}
    bomb = {"epoch": 0, "state_dict": {"net.w": torch.zeros(1 << 22)}}
    return {
        "old pickle": (checkpoint_file(state, legacy=True), "is unreadable as a torch zip"),
        "../ entry": (
            checkpoint_file(state, extra={"archive/../../evil.sh": b"rm -rf ~"}),
            "holds entry 'archive/../../evil.sh', not a plain relative name",
        ),
        "deflate bomb": (checkpoint_file(bomb, deflate=True), "unpacks to 16"),
    }


def test_a_hostile_checkpoint_is_refused_by_name_before_it_is_unpacked(
    client, work_dir, hc18_root, capsys
):
    """Refused from its zip directory: nothing is inflated or unpickled, whichever reads it."""
    from segexp import cli
    from segexp.resume import resume_target

    experiment = client.create_experiment("checkpoints", (work_dir / "artifacts").as_uri())
    for i, (case, (content, reason)) in enumerate(hostile_checkpoints().items()):
        path = work_dir / f"run{i}" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        started = time.monotonic()
        with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path} {reason}")):
            load_checkpoint(path)
        assert time.monotonic() - started < 0.5, case
        output_dir = {"segexp.output_dir": str(path.parent.parent)}
        run_id = client.create_run(experiment, tags=output_dir)
        with pytest.raises(
            ConfigError, match=f"resume={run_id.info.run_id}: .*{re.escape(reason)}"
        ):
            resume_target(client, run_id.info.run_id, [])
    stored = yaml.safe_dump(config.redacted(config.compose(["debug=tiny"])))
    content, reason = hostile_checkpoints()["deflate bomb"]
    run_id = planted_run(
        client, work_dir, {"config.yaml": stored.encode(), "checkpoints/best.ckpt": content}
    )
    assert cli.main(predict_args(run_id, hc18_root, work_dir)) == 2
    assert f"checkpoint checkpoints/best.ckpt of run {run_id} {reason}" in capsys.readouterr().err
