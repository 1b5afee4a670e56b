"""Loading a checkpoint that came from a store: a torch zip archive within bounds, weights only.

A checkpoint may come from someone else's store. `torch.load(weights_only=True)` unpickles no
code, but an old-style pickle fails with a raw UnpicklingError and a deflate bomb (an entry that
inflates to gigabytes) exhausts memory before failing. The archive's directory is read first,
without inflating anything, and whatever is refused or fails is one line naming the file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import torch

from segexp.config import ConfigError

# torch.save stores entries uncompressed (about 1x); a deflate bomb inflates 1000x and more
MAX_INFLATION = 20
MAX_UNPACKED_BYTES = 64 << 30


class CheckpointError(ConfigError):
    """A checkpoint file refused or unreadable; the message names the file."""


def check_archive(path: Path, name: str) -> None:
    """Refuse, as `name`, a file that is no zip, has an entry outside it or inflates too much."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {name} is unreadable as a torch zip archive (truncated, or an "
            f"old-style pickle?): refused ({err})"
        ) from None
    for entry in entries:
        parts = PurePosixPath(entry.filename.replace("\\", "/")).parts
        if not parts or parts[0] == "/" or ".." in parts or ":" in parts[0]:
            raise CheckpointError(
                f"checkpoint {name} holds entry {entry.filename!r}, not a plain relative name: refused"
            )
    unpacked = sum(entry.file_size for entry in entries)
    limit = min(MAX_INFLATION * Path(path).stat().st_size, MAX_UNPACKED_BYTES)
    if unpacked > limit:
        raise CheckpointError(
            f"checkpoint {name} unpacks to {unpacked} bytes, more than {MAX_INFLATION}x its size "
            f"(at most {MAX_UNPACKED_BYTES >> 30} GiB): refused"
        )


def load_checkpoint(path: Path | str, keys: Iterable[str] = (), name: str | None = None) -> dict:
    """The checkpoint at `path` (on CPU, weights only), holding `keys`; CheckpointError otherwise.

    `name` is what messages call the file (default: its path), e.g. the run's artifact path.
    """
    name = name or str(path)
    check_archive(Path(path), name)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a broken or refused file
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"checkpoint {name} is unreadable ({type(err).__name__}: {reason})"
        ) from None
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {name} lacks {missing}")
    return checkpoint
