"""Short names of keys and values, so one run reads the same in a sweep, a blame and a plot."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

SHORT_KEYS = {"batch_size": "bs", "seed": "s", "weight_decay": "wd", "max_epochs": "epochs"}
MAX_VALUE = 40  # characters of a value in a run name


def short_key(key: str) -> str:
    """`optimizer.lr` -> `lr`, `dataset.batch_size` -> `bs`: names that fit a table column."""
    last = key.lstrip("+~").rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    return SHORT_KEYS.get(last, last)


def short_value(value: Any) -> str:
    """`0.0003` -> `3e-4`, nodes as JSON, anything past MAX_VALUE characters cut with `...`."""
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and number != 0 and abs(number) < 0.01:
        mantissa, exponent = f"{number:.2e}".split("e")
        text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


def short_number(value: float) -> str:
    """A statistic in a sentence: 3 significant digits from 1 up, 3 decimals below."""
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}"


def run_label(pairs: Iterable[tuple[str, Any]], seed: Any = None) -> str:
    """`lr=3e-4 bs=16 s=2`: the given keys and values, then the seed when there is one."""
    parts = [f"{short_key(k)}={short_value(v)}" for k, v in pairs]
    if seed is not None:
        parts.append(f"{short_key('seed')}={seed}")
    return " ".join(parts)
