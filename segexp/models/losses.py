"""Loss combinations; single losses come straight from torch and segmentation_models_pytorch."""

from __future__ import annotations

import torch
from torch import nn


class WeightedSum(nn.Module):
    """sum_i weights[i] * losses[i](logits, target), e.g. BCE + Dice."""

    def __init__(self, losses: list[nn.Module], weights: list[float] | None = None):
        super().__init__()
        self.losses = nn.ModuleList(losses)
        self.weights = list(weights) if weights is not None else [1.0] * len(losses)
        if len(self.weights) != len(self.losses):
            raise ValueError(
                f"loss.weights has {len(self.weights)} entries for {len(self.losses)} losses"
            )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(
            w * loss(logits, target) for w, loss in zip(self.weights, self.losses, strict=True)
        )
