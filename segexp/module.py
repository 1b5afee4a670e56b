"""The LightningModule: a network, a loss and an optimizer, with per-case validation metrics.

Batches follow the contract in `segexp.data` (`image` (N, C, H, W), `mask` (N, 1, H, W),
`case_id`, `group`). `forward` returns logits (N, 1, H, W).
"""

from __future__ import annotations

from functools import partial

import pandas as pd
import pytorch_lightning as pl
import torch
from torch import nn

from segexp.metrics import case_table, overlap_counts, summarize
from segexp.tracking import NonFiniteMetricError


class SegModule(pl.LightningModule):
    """Binary segmentation training; validation keeps a per-case table in `self.val_cases`.

    Args:
        optimizer: a partial optimizer (`_partial_: true`) that takes the parameters.
        scheduler: a partial LR scheduler that takes the optimizer, or None.
        volumetric: also report `val/dice_volume` (cases grouped into volumes, e.g. LGG patients).
        channels_last: run the network in channels-last memory format (faster convs on CPU/GPU).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: partial,
        scheduler: partial | None = None,
        volumetric: bool = False,
        channels_last: bool = False,
        monitor: str = "val/loss",
    ):
        super().__init__()
        self.net, self.loss = net, loss
        self.optimizer, self.scheduler = optimizer, scheduler
        self.volumetric, self.channels_last, self.monitor = volumetric, channels_last, monitor
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.val_cases: pd.DataFrame | None = None
        self._val_counts: list[torch.Tensor] = []
        self._val_ids: list[tuple[str, str]] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image)  # logits, (N, 1, H, W)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["mask"])
        if not torch.isfinite(loss):  # stop at once: never train on, or log, a NaN as if fine
            raise NonFiniteMetricError(
                f"train/loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}"
            )
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(batch["image"]),
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["mask"])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]))
        self._val_counts.append(overlap_counts(logits, batch["mask"]))
        self._val_ids.extend(zip(batch["case_id"], batch["group"], strict=True))

    def on_validation_epoch_end(self) -> None:
        counts = torch.cat(self._val_counts).cpu().numpy()  # one host sync per epoch
        case_ids, groups = zip(*self._val_ids, strict=True)
        self.val_cases = case_table(counts, list(case_ids), list(groups))
        self._val_counts, self._val_ids = [], []
        self.log_dict(summarize(self.val_cases, self.volumetric), prog_bar=False)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor},
        }
