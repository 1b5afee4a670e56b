"""The values of a composed run config that cannot train, refused by key with no library loaded:
`segexp train` runs them before it imports torch, so a typo costs a fraction of a second."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from segexp.config import ConfigError


def check_run_values(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot train (targets: `config`)."""
    if OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError(
            f"dataset.root is required for dataset {cfg.dataset.name!r}: "
            f"pass dataset.root=/path/to/{cfg.dataset.name}"
        )
    for key in ("seed", "trainer.max_epochs"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be an integer")
    if cfg.trainer.max_epochs < 1:
        raise ConfigError(f"trainer.max_epochs={cfg.trainer.max_epochs} must be >= 1")
    if not isinstance(cfg.get("optimized_metric"), str) or not cfg.optimized_metric:
        raise ConfigError(f"optimized_metric={cfg.get('optimized_metric')!r} must name a metric")
    if cfg.checkpoint.mode not in ("min", "max"):
        raise ConfigError(f"checkpoint.mode={cfg.checkpoint.mode!r} must be 'min' or 'max'")
    if several_devices(cfg.trainer) and (cfg.dataset.get("oversample_factor") or 1) > 1:
        # its sampler draws with replacement in one process; DDP shards a plain permutation.
        # SegDataModule refuses it too, where the trainer finds several devices by itself.
        raise ConfigError("dataset.oversample_factor > 1 trains in one process, not with DDP")


def several_devices(trainer: DictConfig) -> bool:
    """Whether the trainer config names DDP or more than one device (`-1`, `auto`: not known
    before torch looks; SegDataModule.setup refuses what needs one process there)."""
    devices = trainer.get("devices")
    if OmegaConf.is_list(devices):
        return len(devices) > 1
    if isinstance(devices, str) and "," in devices:  # Lightning's "0,1": device indices
        return len([d for d in devices.split(",") if d.strip()]) > 1
    if isinstance(devices, str) and devices.strip().isdigit():  # "2": a count
        devices = int(devices)
    several = isinstance(devices, int) and not isinstance(devices, bool) and devices > 1
    return several or "ddp" in str(trainer.get("strategy"))


def precheck_command_line(overrides: list[str]) -> None:
    """`check_run_values` of `segexp train OVERRIDES` as Hydra will compose it; silent where it
    cannot compose (a sweep, a flag, a typo in a key: Hydra reports those itself)."""
    from segexp import config

    if any(o.startswith("-") for o in overrides):  # -m, --cfg, --help, ...: Hydra's business
        return
    try:
        check_run_values(config.compose(overrides))
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - Hydra's own run reports it, in its own words
        return
