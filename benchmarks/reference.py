"""The reference LGG trainer's training step, ported for a head-to-head benchmark.

Reference: github.com/mateuszbuda/brain-segmentation-pytorch at d45f8908ab2f (train.py, unet.py,
loss.py). As a user of that repository runs it: its U-Net (32 base features, conv-BN-ReLU x2 per
level, bias-free 3x3 convs, 2x2 transposed-conv upsampling, sigmoid output), its Dice loss
(1 - DSC on probabilities, smooth 1), Adam, fp32, contiguous tensors, torch's default threads,
and `loss.item()` every step as its loop logs it. Written from reading it; no code copied.
"""

from __future__ import annotations

import time

import torch
from torch import nn

REPOSITORY = "https://github.com/mateuszbuda/brain-segmentation-pytorch"
COMMIT = "d45f8908ab2f0246ba204c702a6161c9eb25f902"


def conv_bn_relu_x2(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ReferenceUNet(nn.Module):
    """4 encoder levels (32..256 features), a 512 bottleneck, mirrored decoder; probabilities."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, features: int = 32):
        super().__init__()
        widths = [features * 2**i for i in range(4)]  # 32, 64, 128, 256
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(conv_bn_relu_x2(c, w))
            c = w
        self.bottom = conv_bn_relu_x2(c, 2 * c)
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in widths[::-1])
        self.merge = nn.ModuleList(conv_bn_relu_x2(2 * w, w) for w in widths[::-1])
        self.out = nn.Conv2d(features, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat((up(x), skip), dim=1))  # upsampled first, then the skip
        return torch.sigmoid(self.out(x))


class ReferenceDiceLoss(nn.Module):
    """1 - (2 |P.T| + 1) / (|P| + |T| + 1) over the whole batch's first channel."""

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, t = probabilities[:, 0].reshape(-1), target[:, 0].reshape(-1)
        return 1.0 - (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)


class ReferenceTrainer:
    """The reference loop's train phase: zero_grad, forward, loss, `.item()`, backward, step."""

    def __init__(self, lr: float = 1e-4, seed: int = 0, in_channels: int = 3):
        torch.manual_seed(seed)
        self.net = ReferenceUNet(in_channels).train()
        self.loss = ReferenceDiceLoss()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.losses: list[float] = []

    def step(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss = self.loss(self.net(image), mask)
        self.losses.append(loss.item())
        loss.backward()
        self.optimizer.step()


def throughput(batches: list[dict], lr: float = 1e-4, seed: int = 0) -> float:
    """Train img/s of the reference loop on `batches` (the first is a warm-up, untimed)."""
    trainer = ReferenceTrainer(lr, seed, batches[0]["image"].shape[1])
    trainer.step(batches[0]["image"], batches[0]["mask"])
    start = time.perf_counter()
    for batch in batches[1:]:
        trainer.step(batch["image"], batch["mask"])
    return sum(len(b["image"]) for b in batches[1:]) / (time.perf_counter() - start)
