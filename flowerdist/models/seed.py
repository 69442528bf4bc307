"""The tutorial's small residual network (`seed_resnet`), layer for layer.

Kept exactly as the tutorial has it (258,735 parameters for 5 classes at 224x224) so its numbers
can be reproduced; only the linear layer's width follows `image_size`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowerdist.errors import FlowerdistError
from flowerdist.models.registry import register_model
from flowerdist.models.resnet import ClassifierMixin, init_weights_


class SeedBlock(nn.Module):
    """conv c->30 k5 then conv 30->c k3 (no activation between), output ReLU(out + x)."""

    def __init__(self, channels: int, hidden: int = 30):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))  # (B, C, H, W): both convs keep the size
        return F.relu(out + x)


def feature_side(image_size: int) -> int:
    """Side of the last feature map: conv k5, pool 2, conv k3, pool 2 (the blocks keep the size)."""
    return ((image_size - 4) // 2 - 2) // 2


MIN_IMAGE_SIZE = next(s for s in itertools.count(1) if feature_side(s) >= 1)


class SeedResNet(ClassifierMixin, nn.Module):
    """conv 3->20 k5, pool, ReLU, block(20), conv 20->15 k3, pool, ReLU, block(15), flatten, linear."""

    def __init__(self, num_classes: int = 5, *, image_size: int = 224, init_weights: bool = True):
        super().__init__()
        if image_size < MIN_IMAGE_SIZE:
            raise FlowerdistError(
                f"data.image_size={image_size} is too small for seed_resnet: set data.image_size to at least "
                f"{MIN_IMAGE_SIZE}"
            )
        self.num_classes = num_classes
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, 20, kernel_size=5)
        self.block1 = SeedBlock(20)
        self.conv2 = nn.Conv2d(20, 15, kernel_size=3)
        self.block2 = SeedBlock(15)
        self.num_features = 15 * feature_side(image_size) ** 2  # 43,740 at 224
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if init_weights:
            init_weights_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            # the linear layer's width is fixed by image_size: fail with the fix, not a matmul shape error
            raise FlowerdistError(
                f"seed_resnet was built for {self.image_size}x{self.image_size} images but got "
                f"{x.shape[-2]}x{x.shape[-1]}: build it with image_size equal to data.image_size"
            )
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # (B, 20, (S-4)/2, (S-4)/2): 110 at S=224
        x = self.block1(x)  # (B, 20, 110, 110)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (B, 15, 54, 54)
        return self.block2(x)  # (B, 15, 54, 54)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (B, 43740) at S=224
        return x if pre_logits else self.fc(x)  # (B, num_classes)


@register_model
def seed_resnet(num_classes: int = 5, image_size: int = 224, init_weights: bool = True) -> SeedResNet:
    """The tutorial's network: the baseline every other model is compared with."""
    return SeedResNet(num_classes, image_size=image_size, init_weights=init_weights)
