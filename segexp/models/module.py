"""The LightningModule: a network, a loss and an optimizer, with per-case validation metrics.

Batches follow the contract in `segexp.data` (`image` (N, C, H, W), `mask` (N, 1, H, W),
`case_id`, `group`). `forward` returns logits (N, 1, H, W).
"""

from __future__ import annotations

import contextlib
from functools import partial

import pandas as pd
import pytorch_lightning as pl
import torch
from torch import nn

from segexp import performance
from segexp.evaluation import (
    case_table,
    clinical_table,
    largest_component,
    overlap_counts,
    summarize,
    width_limit,
)
from segexp.tracking import NonFiniteMetricError


def flip_tta_logits(net: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Mean logits of the image and its left-right mirror, mirrored back: (N, 1, H, W)."""
    return (net(image) + net(image.flip(-1)).flip(-1)) / 2


class SegModule(pl.LightningModule):
    """Binary segmentation training; validation keeps a per-case table in `self.val_cases`.

    Args:
        optimizer: a partial optimizer (`_partial_: true`) that takes the parameters.
        scheduler: a partial LR scheduler that takes the optimizer, or None.
        volumetric: also report `val/dice_volume` (cases grouped into volumes, e.g. LGG patients).
        hc_boundary_offset_px: with it, batches that carry `hc_mm` also get head circumference
            metrics (see `segexp.evaluation.hc_from_mask`); None turns HC off.
        channels_last: run the network in channels-last memory format (faster convs on CPU/GPU).
        compile: torch.compile the network in place when the trainer sets up the model (state
            dict keys, hence checkpoints, stay those of the eager network).
        flip_tta, single_object, hc_ellipse_fit: how validation predicts and measures (the
            `evaluation` config node, `conf/evaluation/default.yaml`); `setup` takes the plausible
            HC/eccentricity range of the training masks from the trainer's datamodule.

    On a CPU, validation runs a copy of the network whose BatchNorms are folded into the convs
    (rebuilt each validation epoch; nets torch.fx cannot trace stay eager).
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
        hc_boundary_offset_px: float | None = None,
        compile: bool = False,
        flip_tta: bool = False,
        single_object: bool = False,
        hc_ellipse_fit: str = "moment",
    ):
        super().__init__()
        self.net, self.loss = net, loss
        self.optimizer, self.scheduler = optimizer, scheduler
        self.volumetric, self.channels_last, self.monitor = volumetric, channels_last, monitor
        self.hc_boundary_offset_px = hc_boundary_offset_px
        self.compile = compile
        self.flip_tta, self.single_object = flip_tta, single_object
        self.hc_ellipse_fit = hc_ellipse_fit
        self.hc_plausible: dict | None = None  # {"hc_mm": (lo, hi), "eccentricity": (lo, hi)}
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.val_cases: pd.DataFrame | None = None
        self.val_masks = None
        self._val: dict[str, list] = {}

    def configure_model(self) -> None:
        if self.compile:
            performance.compile_net(self.net)  # on the first step: its time counts in epoch 0

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "hc_plausible", None) is not None:
            self.hc_plausible = datamodule.hc_plausible  # from the training split's masks

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # `segexp predict` flags implausible ellipses with the range of this run's training masks
        # and hesitant ones with the boundary width limit of the epoch these weights validated
        widths = None if self.val_cases is None else self.val_cases.get("boundary_width_px")
        checkpoint["segexp_evaluation"] = {
            "flip_tta": self.flip_tta,
            "single_object": self.single_object,
            "hc_ellipse_fit": self.hc_ellipse_fit,
            "hc_plausible": self.hc_plausible,
            "hc_width_limit_px": None if widths is None else width_limit(widths),
        }

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        # not a registered submodule: the folded copy never enters state_dict or checkpoints
        folded = None if self.training else self.__dict__.get("_folded_net")
        return (self.net if folded is None else folded)(image)  # logits, (N, 1, H, W)

    def on_validation_epoch_start(self) -> None:
        self.__dict__.pop("_folded_net", None)
        if self.device.type == "cpu":
            # `make bench`: 27% faster fp32 channels-last eval of unet_buda at 256 px;
            # a net torch.fx cannot trace validates eagerly
            with contextlib.suppress(Exception):
                self.__dict__["_folded_net"] = performance.fuse_for_eval(self.net)

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) as evaluation sees them: with flip TTA when `flip_tta`."""
        return flip_tta_logits(self, image) if self.flip_tta else self(image)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["mask"])
        # Stop at once on the CPU, where the check is free; on a GPU it would sync every step,
        # so there the epoch-end check of EpochMetricsToMLflow stops the run instead.
        if loss.device.type == "cpu" and not torch.isfinite(loss):
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
        logits = self.predict_logits(batch["image"])
        loss = self.loss(logits, batch["mask"])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch["image"]))
        # kept on the device until the epoch ends: no per-batch host syncs
        keep = {
            "counts": overlap_counts(logits, batch["mask"]),
            "masks": torch.stack(
                [logits[:, 0] > 0, batch["mask"][:, 0] > 0.5], dim=1
            ),  # (N, 2, H, W)
            "case_id": batch["case_id"],
            "group": batch["group"],
        }
        keep.update(
            {k: batch[k] for k in ("original_size", "pixel_size_mm", "hc_mm") if k in batch}
        )
        if self.hc_boundary_offset_px is not None and "hc_mm" in batch:
            keep["probabilities"] = torch.sigmoid(logits[:, 0].float()).half()
        for key, value in keep.items():
            self._val.setdefault(key, []).append(value)

    def on_validation_epoch_end(self) -> None:
        self.__dict__.pop("_folded_net", None)  # stale once the weights train on
        val, self._val = self._val, {}

        def gather(key):  # one host transfer per key per epoch
            return torch.cat(val[key]).cpu().numpy() if key in val else None

        masks, counts = gather("masks"), gather("counts")  # (N, 2, H, W) predicted / true
        if self.single_object:  # one head per image: its largest component, holes filled
            masks[:, 0] = [largest_component(m) for m in masks[:, 0]]
            counts = overlap_counts(
                torch.from_numpy(masks[:, :1]).float() - 0.5, torch.from_numpy(masks[:, 1:]).float()
            ).numpy()
        cases = case_table(counts, sum(val["case_id"], []), sum(val["group"], []))
        clinical = clinical_table(
            masks,
            gather("original_size"),
            gather("pixel_size_mm"),
            gather("probabilities"),
            gather("hc_mm"),
            self.hc_boundary_offset_px or 0.0,
            method=self.hc_ellipse_fit,
            plausible=self.hc_plausible,
        )
        self.val_cases = cases.join(clinical)
        self.val_masks = masks  # (N, 2, H, W) predicted / true, in val_cases order
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
