"""The head-to-head race of `make bench`: training loops stepping in turn on the same batches."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from benchmarks.bounds import PeakRSS
from segexp import config
from segexp.models import build_net
from segexp.performance import Mode, probe, runtime


class Contender:
    """One training loop on the shared batches: its best step time and compile time."""

    def __init__(self, name: str, step, compiled: bool = False):
        self.name, self.step, self.compiled = name, step, compiled
        self.best, self.first, self.rss_mb = float("inf"), 0.0, 0.0


def contender_name(mode: Mode, compiled: bool) -> str:
    return mode.name + (" +compile" if compiled else "")


def segexp_contender(cfg: DictConfig, mode: Mode, compiled: bool) -> Contender:
    """segexp's net, loss and optimizer in a bare loop (no Lightning, no MLflow)."""
    torch.manual_seed(cfg.seed)
    net = build_net(cfg.model)
    loss_fn = config.instantiate(cfg.loss, "loss")
    optimizer = config.instantiate(cfg.optimizer, "optimizer")(net.parameters())
    if mode.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compiled:
        runtime.compile_net(net)

    def step(batch):
        image = batch["image"]
        if mode.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with probe.autocast(mode.precision, torch.device("cpu")):
            loss = loss_fn(net(image), batch["mask"])
        loss.backward()
        optimizer.step()

    return Contender(contender_name(mode, compiled), step, compiled)


def race(contenders: list[Contender], batches: list[dict]) -> None:
    """Batch by batch, every contender in turn; the first batch warms up (and compiles).

    Each contender's `rss_mb` is the process's peak RSS during its own steps: all contenders'
    weights and optimizer states (~0.1 GB each) are resident, each one's activations only
    while it steps (segexp's allocator setting hands freed activations back to the OS).
    """
    for i, batch in enumerate(batches):
        for c in contenders:
            with PeakRSS() as rss:
                start = time.perf_counter()
                c.step(batch)
                seconds = time.perf_counter() - start
            c.rss_mb = max(c.rss_mb, rss.mb)
            if i == 0:
                c.first = seconds
            else:
                c.best = min(c.best, seconds)
