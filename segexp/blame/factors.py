"""What a person changed between two runs, as two-level factors, and the configs of mixed cells.

Runs record the config-group options Hydra chose (`segexp.choices`) and the command-line
overrides (`hydra.overrides`). A changed group option is ONE factor (`optimizer: adam -> sgd`);
a leaf the user overrode on top is a factor of its own; leaves that only changed because their
group changed are not factors. Every cell is composed by Hydra from group options plus overrides,
exactly as `segexp train` would compose it, so no impossible mix (Adam with momentum) is built.

Runs logged without recorded choices fall back to leaf differences of the stored configs,
grouped per config group: a group whose `_target_` differs is one factor whose levels are A's
and B's whole nodes, applied to A's stored config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from segexp import config
from segexp.config import ConfigError
from segexp.tracking import run_label, short_value, tags

from .nested import value_at_budget
from .replicates import Replicate

ABSENT = "<default>"  # a leaf the run did not override: the group's own default
PLAIN = re.compile(r"[A-Za-z_][\w./:-]*")


@dataclass
class Factor:
    """One change from A to B: a group switch, an overridden leaf, or (fallback) a whole node."""

    name: str
    kind: str  # "group" | "leaf" | "node"
    levels: tuple[Any, Any]  # A's and B's option / value / node; None: not overridden

    def label(self) -> str:
        a, b = (ABSENT if v is None else short_value(v) for v in self.levels)
        return f"{self.name}: {a} -> {b}"

    def overrides(self, level: int) -> list[str]:
        """The Hydra overrides that put a cell at this level."""
        value = self.levels[level]
        if value is None:
            return []
        return [f"{self.name}={override_value(value)}"]


@dataclass
class Change:
    """The factors between two runs and how to compose any cell of them."""

    factors: list[Factor]
    base: list[str] = field(default_factory=list)  # A's choices and leaf overrides
    stored: dict | None = None  # fallback: A's stored config, cells are merged into it

    def cell_overrides(self, levels: tuple[int, ...], extra: list[str]) -> list[str]:
        factor_overrides = [
            o for f, lv in zip(self.factors, levels, strict=True) for o in f.overrides(lv)
        ]
        return [*self.base, *factor_overrides, *extra]

    def cell_config(self, levels: tuple[int, ...], extra: list[str]) -> DictConfig:
        """The composed config of one cell (ConfigError naming the cell when it cannot exist)."""
        try:
            if self.stored is None:
                return config.compose(self.cell_overrides(levels, extra))
            cfg = OmegaConf.create(self.stored)
            for factor, level in zip(self.factors, levels, strict=True):
                OmegaConf.update(
                    cfg, factor.name, factor.levels[level], merge=False, force_add=True
                )
            return OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra))
        except Exception as err:  # Hydra and OmegaConf raise many types for a bad composition
            names = ", ".join(
                f"{f.name}={short_value(f.levels[lv])}"
                for f, lv in zip(self.factors, levels, strict=True)
            )
            raise ConfigError(f"cell ({names}) cannot be composed: {err}") from err


def override_value(value: Any) -> str:
    """A value in Hydra's override grammar (quoted where it would parse otherwise)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if PLAIN.fullmatch(text) and text.lower() not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def select(node: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def between(run_a, run_b, config_a: dict, config_b: dict) -> Change:
    """The factors that turn run A into run B (see the module docstring)."""
    tags_a, tags_b = run_a.data.tags, run_b.data.tags
    if tags.CHOICES in tags_a and tags.CHOICES in tags_b:
        return from_choices(tags_a, tags_b, config_a, config_b)
    return from_leaves(config_a, config_b)


def from_choices(tags_a: dict, tags_b: dict, config_a: dict, config_b: dict) -> Change:
    choices_a, choices_b = (
        json.loads(tags_a[tags.CHOICES]),
        json.loads(tags_b[tags.CHOICES]),
    )
    over_a = config.assigned(tags_a.get("hydra.overrides", "").split())
    over_b = config.assigned(tags_b.get("hydra.overrides", "").split())
    groups = set(choices_a) | set(choices_b)
    # the experiment bundles leaf and group changes: those are the factors, not its name
    changed = sorted(
        g for g in groups if g != "experiment" and choices_a.get(g) != choices_b.get(g)
    )
    factors = [Factor(g, "group", (choices_a.get(g), choices_b.get(g))) for g in changed]
    leaf_keys = {
        k for k in set(over_a) | set(over_b) if k not in groups and not config.is_bookkeeping(k)
    }
    for key in sorted(leaf_keys):
        if over_a.get(key) != over_b.get(key):
            factors.append(Factor(key, "leaf", (typed(over_a.get(key)), typed(over_b.get(key)))))
    base = [f"{g}={v}" for g, v in sorted(choices_a.items()) if g not in changed and v is not None]
    base += [f"{k}={v}" for k, v in over_a.items() if k not in groups and k not in leaf_keys]
    base += [
        f"{k}={v}" for k, v in over_a.items() if k in leaf_keys and over_a.get(k) == over_b.get(k)
    ]
    change = Change(factors, base)
    # leaves the experiments (or edited config files) changed that no group switch explains
    switched = config.compose([*base, *(o for f in factors for o in f.overrides(1))])
    explained = OmegaConf.to_container(switched, resolve=True)
    flat_switched, flat_b = config.flatten(explained), config.flatten(config_b)
    names = {f.name for f in factors}
    for key in sorted(set(flat_switched) | set(flat_b)):
        if (
            config.is_bookkeeping(key)
            or key in names
            or any(key.startswith(f"{n}.") for n in names)
        ):
            continue
        if flat_switched.get(key) != flat_b.get(key):
            factors.append(Factor(key, "leaf", (select(config_a, key), select(config_b, key))))
    return change


def typed(text: str | None) -> Any:
    """An override's value as Hydra would type it (`3e-4` a float, `[1,2]` a list)."""
    if text is None:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={text}").value()


def from_leaves(config_a: dict, config_b: dict) -> Change:
    flat_a, flat_b = config.flatten(config_a), config.flatten(config_b)
    keys = sorted(
        k
        for k in set(flat_a) | set(flat_b)
        if not config.is_bookkeeping(k) and flat_a.get(k) != flat_b.get(k)
    )
    groups = {k.split(".", 1)[0] for k in keys if "." in k}
    # a group whose `_target_` changed is one factor: its whole node, never mixed leaf by leaf
    nodes = sorted(
        g for g in groups if select(config_a, f"{g}._target_") != select(config_b, f"{g}._target_")
    )
    factors = [Factor(n, "node", (select(config_a, n), select(config_b, n))) for n in nodes]
    factors += [
        Factor(k, "leaf", (select(config_a, k), select(config_b, k)))
        for k in keys
        if k.split(".", 1)[0] not in nodes
    ]
    return Change(factors, stored=config_a)


def cell_name(change: Change, levels: tuple[int, ...], replicate: list[tuple[str, int]]) -> str:
    """A short, distinct run name: the factors at B's level, e.g. `optimizer=sgd lr=1e-3 s=43`."""
    at_b = [(f.name, f.levels[1]) for f, level in zip(change.factors, levels, strict=True) if level]
    return run_label(at_b + replicate) if at_b else f"A {run_label(replicate)}"


@dataclass
class Cell:
    """One (cell, seed) of the design: its composed config, hash, and run once known."""

    levels: tuple[int, ...]
    seed: int  # the replicate (replicates.py): the seed, unless folds are replicates too
    name: str
    overrides: list[str]
    cfg: DictConfig
    hash: str
    run_id: str | None = None
    source: Cell | None = None  # a cell to more epochs whose history holds this one's value
    tags: dict[str, str] = field(default_factory=dict)  # set on its run (e.g. its fidelity)
    run_seed: int | None = None  # the seed it trains at, where that is not `seed`

    @property
    def training_seed(self) -> int:
        return self.seed if self.run_seed is None else self.run_seed


class Cells:
    """Every (cell, seed) of the design, by (levels, seed), and the cells that cannot exist."""

    def __init__(self, change: Change, extra: list[str], prefix="", tags=None, replicate=None):
        self.change, self.extra = change, extra
        self.replicate = replicate or Replicate()  # seeds
        self.prefix, self.tags = prefix, dict(tags or {})  # run names and tags of every cell
        self.rows: dict[tuple, Cell] = {}  # (levels, seed) -> cell
        self.impossible: dict[tuple, str] = {}  # levels -> why it cannot be composed

    def add(self, levels: tuple[int, ...], seed: int) -> Cell | None:
        key = (levels, seed)
        if key in self.rows or levels in self.impossible:
            return self.rows.get(key)
        overrides = [*self.extra, *self.replicate.overrides(seed)]
        try:
            cfg = self.change.cell_config(levels, overrides)
        except ConfigError as err:
            self.impossible[levels] = str(err)
            return None
        self.rows[key] = Cell(
            levels,
            seed,
            self.prefix + cell_name(self.change, levels, self.replicate.label(seed)),
            self.change.cell_overrides(levels, overrides),
            cfg,
            config.config_hash(config.redacted(cfg)),
            tags=self.tags,
            run_seed=self.replicate.seed_of(seed),
        )
        return self.rows[key]

    def table(self, names: list[str], client, metric: str, nest=None) -> pd.DataFrame:
        """runs.csv: a 0/1 column per factor, seed, run_id, the metric (empty = failed).

        A cell read from a longer run's history (`nest`, see nested.py) has no run of its own:
        `read_from` names the run it was read from.
        """
        records = []
        for cell in self.rows.values():
            run_id = cell.source.run_id if cell.source else cell.run_id
            value = None
            if run_id:
                run = client.get_run(run_id)
                if run.info.status == "FINISHED":
                    value = (
                        value_at_budget(client, run_id, nest)
                        if cell.source
                        else run.data.metrics.get(metric)
                    )
            records.append(
                {
                    **dict(zip(names, cell.levels, strict=True)),
                    "seed": cell.seed,
                    "run_id": None if cell.source else cell.run_id,
                    "read_from": run_id if cell.source else None,
                    metric: value,
                }
            )
        return pd.DataFrame(records)
