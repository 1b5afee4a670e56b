"""Models: the U-Net, loss combinations and the LightningModule that trains them."""

from .losses import WeightedSum
from .module import SegModule, flip_tta_logits
from .unet import UNet, build_net

__all__ = ["UNet", "build_net", "WeightedSum", "SegModule", "flip_tta_logits"]
