"""ResNet-18/34/50/101/152 from scratch, with the paper's three shortcut options and its plain networks.

Shortcut B reproduces torchvision's ResNets (v1.5: stride on the bottleneck's 3x3 conv) parameter for
parameter, so torchvision state dicts load strictly. A and C exist to compare the options of He et al.
(2015), section 3.3: A = parameter-free identity (zero-padded channels, strided subsampling),
B = projection only where the shape changes, C = projection on every block; `none` drops the
shortcut altogether, giving the plain networks of the paper's degradation experiment (figure 4).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowerdist.errors import FlowerdistError
from flowerdist.models.registry import register_model

SHORTCUTS = ("A", "B", "C", "none")


def init_weights_(model: nn.Module, zero_init_last: bool = False) -> None:
    """torchvision's init: kaiming-normal (fan_out, relu) convs, zero conv biases, BN weight 1 bias 0.

    `zero_init_last` zeroes each residual block's last BN gamma, so every block starts as identity.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_last:
        for m in model.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()


class ClassifierMixin:
    """timm's uniform interface: `forward_features`, `forward_head`, `reset_classifier`, `num_classes`.

    The host class sets `num_features` and `fc` and defines `forward_features` / `forward_head`.
    """

    num_classes: int
    num_features: int
    fc: nn.Module

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """New (freshly initialised) head for `num_classes` classes; 0 leaves pooled features."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ShortcutA(nn.Module):
    """Option A where the shape changes: subsample by striding and zero-pad the new channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, C, ceil(H/s), ceil(W/s)), as the strided 3x3 conv
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))  # (B, C + extra, H', W')

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


def make_shortcut(kind: str, inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    """The shortcut of one block (None = plain identity), following option `kind` (not called for `none`)."""
    shape_changes = stride != 1 or inplanes != outplanes
    if kind == "A":
        return ShortcutA(stride, outplanes - inplanes) if shape_changes else None
    if kind == "B" and not shape_changes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
    )


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(inplanes: int, planes: int) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the first one strides."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))  # shortcut: (B, planes, H/s, W/s)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as torchvision v1.5), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, residual: bool = True):
        super().__init__()
        self.residual = residual
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, planes, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4*planes, H/s, W/s)
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))  # shortcut: (B, 4*planes, H/s, W/s)
        return self.relu(out)


class ResNet(ClassifierMixin, nn.Module):
    """ResNet with torchvision's module names (conv1, bn1, layer1..4, fc) and a choice of shortcut."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        shortcut: str = "B",
        in_chans: int = 3,
        init_weights: bool = True,
        zero_init_last: bool = False,
    ):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise FlowerdistError(
                f"model.shortcut={shortcut!r} is not a ResNet shortcut option: use A (zero-pad identity), "
                f"B (projection where the shape changes), C (projection everywhere) or none (plain network)"
            )
        self.shortcut = shortcut
        self.num_classes = num_classes
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if init_weights:
            init_weights_(self, zero_init_last)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int):
        layers = []
        residual = self.shortcut != "none"
        for i in range(blocks):
            outplanes = planes * block.expansion
            downsample = make_shortcut(self.shortcut, self.inplanes, outplanes, stride if i == 0 else 1) if residual else None
            layers.append(block(self.inplanes, planes, stride if i == 0 else 1, downsample, residual))
            self.inplanes = outplanes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = self.maxpool(x)  # (B, 64, H/4, W/4)
        x = self.layer1(x)  # (B, 64*e, H/4, W/4), e = block expansion
        x = self.layer2(x)  # (B, 128*e, H/8, W/8)
        x = self.layer3(x)  # (B, 256*e, H/16, W/16)
        return self.layer4(x)  # (B, 512*e, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)  # (B, 512*e)
        return x if pre_logits else self.fc(x)  # (B, num_classes)


@register_model
def resnet18(num_classes: int = 1000, shortcut: str = "B", init_weights: bool = True, zero_init_last: bool = False) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2]."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, shortcut=shortcut, init_weights=init_weights, zero_init_last=zero_init_last)


@register_model
def resnet34(num_classes: int = 1000, shortcut: str = "B", init_weights: bool = True, zero_init_last: bool = False) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3]."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, shortcut=shortcut, init_weights=init_weights, zero_init_last=zero_init_last)


@register_model
def resnet50(num_classes: int = 1000, shortcut: str = "B", init_weights: bool = True, zero_init_last: bool = False) -> ResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3]."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, shortcut=shortcut, init_weights=init_weights, zero_init_last=zero_init_last)


@register_model
def resnet101(num_classes: int = 1000, shortcut: str = "B", init_weights: bool = True, zero_init_last: bool = False) -> ResNet:
    """ResNet-101: Bottleneck x [3, 4, 23, 3]."""
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, shortcut=shortcut, init_weights=init_weights, zero_init_last=zero_init_last)


@register_model
def resnet152(num_classes: int = 1000, shortcut: str = "B", init_weights: bool = True, zero_init_last: bool = False) -> ResNet:
    """ResNet-152: Bottleneck x [3, 8, 36, 3]."""
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, shortcut=shortcut, init_weights=init_weights, zero_init_last=zero_init_last)
