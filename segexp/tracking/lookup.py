"""Runs read back from the store: a stored config, children, adopted runs, a FINISHED twin."""

from __future__ import annotations

import tempfile

from mlflow import MlflowClient
from mlflow.entities import Run

from segexp import config
from segexp.config import ConfigError

from . import tags

MAX_RUNS = 5000  # per search: more than any sweep or blame segexp makes


def stored_config(client: MlflowClient, run_id: str) -> dict:
    """A run's logged config.yaml, read as data (targets checked, old layouts moved)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config.yaml", tmp)
        except Exception as err:  # MLflow raises several types for a missing artifact
            raise ConfigError(f"run {run_id} has no readable config.yaml ({err})") from err
        return config.read_stored(path, run_id)


def children(client: MlflowClient, parent: Run) -> list[Run]:
    """Child runs of `parent` (a sweep or a blame), oldest first."""
    return client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{tags.PARENT}` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=MAX_RUNS,
    )


def reused_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """Runs of earlier sweeps that a `sweep.resume=true` job of `parent` adopted, not retrained."""
    return client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{tags.REUSED_BY_SWEEP}` = '{parent.info.run_id}'",
        max_results=MAX_RUNS,
    )


def run_key(run: Run) -> tuple[str, str | None]:
    """What a run trained: (config hash, seed); runs without a hash are their own key."""
    return run.data.tags.get(tags.CONFIG_HASH, run.info.run_id), run.data.params.get("seed")


def finished_run(
    client: MlflowClient,
    experiment_id: str,
    config_hash: str,
    seed: int | str,
    fingerprint: str | None = None,
) -> Run | None:
    """The latest FINISHED run of this config hash and seed (on this data) in the experiment."""
    data = f" and tags.`{tags.FINGERPRINT}` = '{fingerprint}'" if fingerprint else ""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{tags.CONFIG_HASH}` = '{config_hash}' and params.seed = '{seed}'"
        f" and attributes.status = 'FINISHED'{data}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def optimized_metric(runs: list[Run]) -> str:
    """The `optimized_metric` the runs share (runs logged without one: the old default)."""
    names = {r.data.params.get("optimized_metric", config.DEFAULT_METRIC) for r in runs}
    if len(names) > 1:
        raise ConfigError(f"the runs optimize different metrics {sorted(names)}: pass --metric")
    return names.pop() if names else config.DEFAULT_METRIC
