"""The networks: a `model` config built into a module, and the plain U-Net of both seed projects.

`segmentation_models_pytorch` (`model=smp`) covers every other architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from segexp import config


def build_net(model_cfg: DictConfig) -> nn.Module:
    """The network of a `model` config (its `_target_` checked against the allowed targets)."""
    return config.instantiate(model_cfg, "model")


def _block(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in in (in_channels, out_channels):
        layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net with `features[:-1]` encoder levels, a `features[-1]` bottleneck, mirrored decoder.

    `features=[16, 32, 64]` is the HC18 seed's small U-Net; `[32, 64, 128, 256, 512]` with batch
    norm is the LGG reference (Buda et al. 2019). Returns logits (N, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features=(16, 32, 64),
        batch_norm: bool = False,
    ):
        super().__init__()
        features = list(features)
        self.encoders = nn.ModuleList()
        c = in_channels
        for f in features[:-1]:
            self.encoders.append(_block(c, f, batch_norm))
            c = f
        self.bottleneck = _block(c, features[-1], batch_norm)
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        c = features[-1]
        for f in reversed(features[:-1]):
            self.ups.append(nn.ConvTranspose2d(c, f, 2, stride=2))
            self.decoders.append(_block(2 * f, f, batch_norm))
            c = f
        self.head = nn.Conv2d(c, out_channels, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = self._decode(decoder, up(x), skip)
        return self.head(x)

    def _decode(self, decoder: nn.Sequential, up: torch.Tensor, skip: torch.Tensor):
        """decoder(cat([up, skip])). In fp32 training the first conv runs on each part with its
        half of the weights and adds them: the same conv, but autograd keeps no concatenated copy
        of the skip (unet_buda 256 px batch 16: 250 MB less at the peak). Under autocast the
        plain form, since two 16-bit partial sums would round twice; in eval too (which
        `runtime.fuse_for_eval` folds)."""
        if not self.training or torch.is_autocast_enabled(up.device.type):
            return decoder(torch.cat([up, skip], dim=1))
        conv, rest = decoder[0], decoder[1:]
        weight = conv.weight  # (out, up channels + skip channels, 3, 3)
        x = F.conv2d(up, weight[:, : up.shape[1]], conv.bias, padding=conv.padding)
        x = x.add_(F.conv2d(skip, weight[:, up.shape[1] :], None, padding=conv.padding))
        return rest(x)
