"""What a run would have reported stopped after 1, 2, ... epochs, read from its histories."""

from __future__ import annotations

from mlflow import MlflowClient

BEST = "_best"  # a restored best epoch's metric: `val/dice_best` is `val/dice` at that epoch


def best_so_far(watched: list[float], values: list[float], mode: str) -> list[float]:
    """After each epoch e, `values` at the best epoch of `watched` among epochs 0..e.

    The first best epoch wins, as Lightning's ModelCheckpoint keeps the earliest of ties.
    """
    out, best = [], 0
    for epoch, score in enumerate(watched):
        better = score < watched[best] if mode == "min" else score > watched[best]
        best = epoch if better else best
        out.append(values[best])
    return out


def epoch_values(client: MlflowClient, run_id: str, metric: str, monitor: str, mode: str):
    """What the run would have reported stopped after 1, 2, ... epochs (a list; None: no history).

    A best-epoch metric (`val/dice_best`) is its per-epoch key at the best epoch so far by the
    monitor; any other metric is its value at that epoch.
    """
    key = metric[: -len(BEST)] if metric.endswith(BEST) else metric
    keys = (monitor, key) if metric.endswith(BEST) else (key,)
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
    epochs = sorted(history[keys[0]])
    if not epochs or epochs != list(range(len(epochs))):
        return None
    if any(e not in history[key] for e in epochs):
        return None
    values = [history[key][e] for e in epochs]
    if not metric.endswith(BEST):
        return values
    return best_so_far([history[monitor][e] for e in epochs], values, mode)
