"""Config identity and safety: composition, flattening, hashing, secrets, allowed targets.

A config read back from an MLflow store may come from someone else: it is data, never code.
Every `_target_` segexp instantiates passes `check_targets` first (through `instantiate`), so
only callables named exactly by segexp's own config groups, the transform / optimizer / loss /
architecture classes of the libraries they point at, or the user's `SEGEXP_ALLOWED_TARGETS` can
be built; code-loading and unpickling callables are refused whatever the lists say.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "conf"  # package data: a wheel install composes every experiment
ALLOW_ENV = "SEGEXP_ALLOWED_TARGETS"  # comma-separated extra targets, e.g. `mypkg.nets.MyNet`
# Callables that load code or unpickle, refused even when a list names them.
REFUSED = re.compile(
    r"(^|\.)(load|loads|load_state_dict|load_url|from_pretrained|read_pickle|eval|exec|compile"
    r"|system|popen|import_module|__import__|getattr|run|call|check_output|spawnv?p?e?)$"
    r"|^(builtins|os|sys|subprocess|importlib|pickle|dill|cloudpickle|joblib|marshal|runpy|shutil"
    r"|torch\.hub|torch\.package|torch\.jit|torch\.serialization|torch\.utils\.model_zoo"
    r"|hydra\.utils|albumentations\.core\.serialization)(\.|$)"
    r"|^albumentations\.(Lambda|load|from_dict)$"
)
SECRET_KEY = re.compile(r"pass(word)?|secret|token|api_?key|credential", re.IGNORECASE)
# userinfo's password: up to the authority's last `@` (`u:p@ss@host`), an empty user too (`:tok@h`)
URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^/\s]*)(@[^@/\s]*)")
OVERRIDE_SECRET = re.compile(
    r"((?:pass(?:word)?|secret|token|api_?key|credential)[^=\s]*=)\S+", re.IGNORECASE
)
# Keys that say where and how a run was recorded, not what was trained.
BOOKKEEPING = (
    "work_dir",
    "run_name",
    "resume",
    "tracking.",
    "dataset.root",
    "dataset.cache_dir",
    "dataset.num_workers",
    "performance.",  # memory layout and compilation change speed, not what is trained
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "sweep.",
    "optimized_metric",  # what is reported, not what is trained
)
REPLICATE = ("seed", "dataset.split_seed")  # replicates, not factors
DEFAULT_METRIC = "val/dice_best"  # `optimized_metric` of runs logged before the key existed


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


def compose(overrides: list[str] | None = None, choices: bool = False):
    """conf/train.yaml with CLI-style overrides, as `segexp train` composes it.

    With `choices=True` returns (cfg, {group: option}) — the config-group choices Hydra made.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose beside it
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=choices)
    else:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose("train", overrides=overrides, return_hydra_config=choices)
    if not choices:
        return cfg
    picked = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, picked


def parse_overrides(overrides: Iterable[str]):
    """Command-line overrides as Hydra parses them (`Override`s); ConfigError naming a bad one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the overrides: {err.message}") from None


def assigned(overrides: Iterable[str]) -> dict[str, str]:
    """{key: value} of the overrides that set one value (`+`/`++` dropped; deletions, sweeps out)."""
    return {
        o.key_or_group: o.get_value_element_as_str()
        for o in parse_overrides(overrides)
        if not o.is_delete() and not o.is_sweep_override()
    }


def is_bookkeeping(key: str) -> bool:
    return key in REPLICATE or any(
        key == b or (b.endswith(".") and key.startswith(b)) for b in BOOKKEEPING
    )


def flatten(node: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict as `a.b.c -> value` strings, lists kept whole, values never truncated."""
    flat: dict[str, str] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def config_hash(config: dict) -> str:
    """Hash of what was trained (bookkeeping and seed excluded): equal configs, equal hashes."""
    flat = {k: v for k, v in flatten(config).items() if not is_bookkeeping(k)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def redact(key: str, value: str) -> str:
    """Hide passwords in URIs and the values of secret-looking keys."""
    if SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return "***"
    value = OVERRIDE_SECRET.sub(r"\1***", value)
    return URI_PASSWORD.sub(r"\1***\3", value)


def redacted(cfg: DictConfig | ListConfig, key: str = "", raw=None):
    """The resolved config as plain containers, with secret values and URI passwords hidden.

    A value written as `${oc.env:NAME}` is kept as that text: what the environment held
    (a token, a password) never reaches params, tags or config.yaml, and resume re-reads it.
    """
    if OmegaConf.is_config(cfg):
        raw = OmegaConf.to_container(cfg, resolve=False)
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(raw, str) and "${oc.env:" in raw:
        return raw
    if isinstance(cfg, dict):
        raw = raw if isinstance(raw, dict) else {}
        return {k: redacted(v, f"{key}.{k}", raw.get(k)) for k, v in cfg.items()}
    if isinstance(cfg, list):
        raw = raw if isinstance(raw, list) and len(raw) == len(cfg) else [None] * len(cfg)
        return [redacted(v, key, r) for v, r in zip(cfg, raw, strict=True)]
    return redact(key, cfg) if isinstance(cfg, str) else cfg


@functools.lru_cache(maxsize=1)
def allowed_targets() -> frozenset[str]:
    """Every `_target_` segexp's config groups name, plus the library classes they select from.

    Matched exactly: albumentations transforms, torch optimizers, LR schedulers and loss modules,
    segmentation_models_pytorch architectures and losses (classes, never functions that load).
    """
    names: set[str] = set()
    for path in CONFIG_DIR.rglob("*.yaml"):
        names.update(_targets_in(yaml.safe_load(path.read_text())))
    names.update(_library_classes())
    names.update(t.strip() for t in os.environ.get(ALLOW_ENV, "").split(",") if t.strip())
    return frozenset(n for n in names if not REFUSED.search(n))


def _library_classes() -> set[str]:
    import albumentations
    import segmentation_models_pytorch as smp
    import torch

    found = set()
    for module, base in (
        (albumentations, albumentations.BasicTransform),
        (albumentations, albumentations.BaseCompose),
        (torch.optim, torch.optim.Optimizer),
        (torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler),
        (torch.optim.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
        (torch.nn, torch.nn.modules.loss._Loss),
        (smp, torch.nn.Module),
        (smp.losses, torch.nn.modules.loss._Loss),
    ):
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, base) and not name.startswith("_"):
                found.add(f"{module.__name__}.{name}")
    return found


def _targets_in(node) -> set[str]:
    if isinstance(node, dict):
        found = {str(node["_target_"])} if "_target_" in node else set()
        return found.union(*(_targets_in(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_targets_in(v) for v in node))
    return set()


def check_targets(node, path: str = "") -> None:
    """Raise ConfigError naming the key and target of any `_target_` that may not be built."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True)  # interpolations cannot hide a target
    items = node.items() if isinstance(node, dict) else enumerate(node or [])
    for key, value in items:
        name = f"{path}.{key}" if path else str(key)
        if key == "_target_":
            target = str(value)
            if REFUSED.search(target):
                raise ConfigError(
                    f"{name}={target!r} is refused: it loads code or pickles, which a config "
                    "(possibly read from a shared store) may never do"
                )
            if target not in allowed_targets():
                raise ConfigError(
                    f"{name}={target!r} is not an allowed target: only the targets of segexp's "
                    f"config groups and their libraries' classes are. To allow a target you "
                    f"trust, add it to {ALLOW_ENV} (comma-separated, matched exactly)"
                )
        elif isinstance(value, dict | list):
            check_targets(value, name)


def instantiate(node, path: str, **kwargs):
    """`hydra.utils.instantiate` behind `check_targets`: the one door to building a config."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    check_targets(node, path)
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:  # a constructor refused its arguments: name the key
        cause = err.__cause__ or err
        raise ConfigError(f"{path}: {type(cause).__name__}: {cause}") from err


# Targets of segexp's own classes under the names of the flat layout: old runs still resume.
MOVED_TARGETS = {
    "segexp.losses.WeightedSum": "segexp.models.WeightedSum",
}


def _renamed_targets(node):
    """`node` with every `_target_` of MOVED_TARGETS renamed (a new structure)."""
    if isinstance(node, dict):
        return {
            k: MOVED_TARGETS.get(v, v) if k == "_target_" else _renamed_targets(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_renamed_targets(v) for v in node]
    return node


# Keys of older runs' configs (node.key) and where they live now: old runs still resume/predict.
MOVED_KEYS = {
    "model.channels_last": "performance.channels_last",
    "dataset.flip_tta": "evaluation.flip_tta",
    "dataset.single_object": "evaluation.single_object",
    "dataset.hc_ellipse_fit": "evaluation.hc_ellipse_fit",
}


def _move_keys(stored: dict) -> None:
    """Move the MOVED_KEYS `stored` has to their new node, in place; a value already there wins."""
    for old, new in MOVED_KEYS.items():
        (node, key), (new_node, new_key) = old.split("."), new.split(".")
        if isinstance(stored.get(node), dict) and key in stored[node]:
            stored.setdefault(new_node, {}).setdefault(new_key, stored[node].pop(key))


def _early_stopping(node, stored: dict) -> dict:
    """`early_stopping: {patience: N}` of an old config as today's `callbacks` node."""
    if not isinstance(node, dict):
        return {}
    checkpoint = stored.get("checkpoint") or {}
    return {
        "early_stopping": {
            "_target_": "pytorch_lightning.callbacks.EarlyStopping",
            "monitor": checkpoint.get("monitor"),
            "mode": checkpoint.get("mode"),
            **node,
        }
    }


# What a stored config may expand to: segexp logs a few KB, ~100 values, 6 levels deep.
MAX_STORED_BYTES, MAX_STORED_VALUES, MAX_STORED_DEPTH = 1 << 20, 20_000, 32


def check_bounds(stored: dict, run_id: str) -> None:
    """Refuse a config beyond MAX_STORED_VALUES or MAX_STORED_DEPTH, as soon as it is exceeded.

    A YAML alias is one object reached many times: it counts each time, as every walk of the
    config (target checks, OmegaConf) would expand it (a billion laughs: 10^9 values).
    """
    stack, seen = [(stored, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_STORED_VALUES or depth > MAX_STORED_DEPTH:
            bound = (
                f"{MAX_STORED_VALUES} values"
                if depth <= MAX_STORED_DEPTH
                else f"depth {MAX_STORED_DEPTH}"
            )
            raise ConfigError(
                f"run {run_id}: config.yaml expands beyond {bound} (YAML aliases?): refused"
            )
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)


def read_stored(path: Path, run_id: str) -> dict:
    """A config.yaml read back from a store: data (safe YAML, targets checked), in today's layout.

    Keys that moved since a run was logged (MOVED_KEYS) move to their node of today.
    Targets named by the flat module layout segexp once had are renamed to today's names, and a
    config without `optimized_metric` gets the default's.
    """
    try:
        if Path(path).stat().st_size > MAX_STORED_BYTES:
            raise ConfigError(
                f"run {run_id}: config.yaml is over {MAX_STORED_BYTES} bytes: refused"
            )
        # libyaml when built: a megabyte in a fraction of a second, and a bounded nesting depth
        stored = yaml.load(Path(path).read_text(), getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, RecursionError, yaml.YAMLError) as err:
        raise ConfigError(f"run {run_id}: config.yaml is unreadable ({err})") from err
    if not isinstance(stored, dict):
        raise ConfigError(f"run {run_id}: config.yaml is not a mapping")
    check_bounds(stored, run_id)
    stored = _renamed_targets(stored)
    try:  # stored configs are data: refuse what may not be built before anything runs
        check_targets(stored)
    except ConfigError as err:
        raise ConfigError(f"run {run_id}: {err}") from None
    stored.setdefault("optimized_metric", DEFAULT_METRIC)
    if "early_stopping" in stored:  # a top-level node before callbacks were configurable
        stored.setdefault("callbacks", _early_stopping(stored.pop("early_stopping"), stored))
    _move_keys(stored)
    return stored
