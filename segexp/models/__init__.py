"""Models: the U-Net, loss combinations and the LightningModule that trains them."""

from .checkpoint import CheckpointError, load_checkpoint
from .losses import WeightedSum
from .module import SegModule, flip_tta_logits
from .unet import UNet, build_net

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "UNet",
    "build_net",
    "WeightedSum",
    "SegModule",
    "flip_tta_logits",
]
