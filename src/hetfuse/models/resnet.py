"""CIFAR-style ResNets of BasicBlocks.

``ResNet(blocks, widths)``: a stem ``conv1`` (3x3, stride 1, padding 1) + ``bn1`` + ``relu``, then one
stage ``layer{i}`` (an ``nn.Sequential`` of :class:`BasicBlock`) per entry of ``blocks`` with
``widths[i]`` channels (the stem has ``widths[0]``); the first block of stage 0 has stride 1, the first
block of every later stage stride 2. Then ``avgpool`` (AdaptiveAvgPool2d(1)), ``flatten`` and ``fc``.

Named families (``width`` multiplies the base widths, ``max(1, round(w * c))`` channels):

* 4 stages, base widths 64, 128, 256, 512: ``resnet18`` ([2, 2, 2, 2]), ``resnet34`` ([3, 4, 6, 3]).
* 3 stages ``[n, n, n]`` (depth ``6n + 2``), base widths 16, 32, 64: ``resnet20`` (n=3), ``resnet26`` (n=4),
  ``resnet32`` (n=5) and ``resnet50`` (n=8). Note: ``resnet50`` here is the CIFAR ``[n, n, n]`` BasicBlock
  network of depth 50, as the "ResNet50" of the seed-003 paper, *not* the ImageNet bottleneck ResNet-50.

Without BatchNorm (``bn=False``) every BatchNorm2d is replaced by ``nn.Identity`` (so the convolutions are
plain, with biases as ``bias`` says) and a projection shortcut is a lone 1x1 conv. Everything traces with
``torch.fx.symbolic_trace``: the residual is a ``+`` and the identity shortcut an empty ``nn.Sequential``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .vgg import scale_width

# name -> (blocks per stage, base widths)
RESNET_FAMILIES: dict[str, tuple[list[int], list[int]]] = {
    "resnet18": ([2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ([3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet20": ([3, 3, 3], [16, 32, 64]),
    "resnet26": ([4, 4, 4], [16, 32, 64]),
    "resnet32": ([5, 5, 5], [16, 32, 64]),
    "resnet50": ([8, 8, 8], [16, 32, 64]),  # CIFAR [n, n, n] family, n = 8 (not the bottleneck ResNet-50)
}


def _norm(channels: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions.

    ``shortcut`` is an empty ``nn.Sequential`` (identity) when the shape is kept, else a 1x1 conv with the
    block's stride followed by BatchNorm2d (when ``bn``).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, bn: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(planes, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=bias)
        self.bn2 = _norm(planes, bn)
        if stride != 1 or in_planes != planes:
            proj: list[nn.Module] = [nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=bias)]
            if bn:
                proj.append(nn.BatchNorm2d(planes))
            self.shortcut = nn.Sequential(*proj)
        else:
            self.shortcut = nn.Sequential()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet of BasicBlocks; see the module docstring for the layout."""

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                 bn: bool = True, bias: bool = False) -> None:
        super().__init__()
        blocks = [int(b) for b in blocks]
        widths = [int(w) for w in widths]
        if not blocks or len(blocks) != len(widths):
            raise ValueError(f"ResNet needs one width per stage and at least one stage, got blocks {blocks}, "
                             f"widths {widths}")
        if any(b <= 0 for b in blocks) or any(w <= 0 for w in widths):
            raise ValueError(f"ResNet blocks and widths must be positive, got blocks {blocks}, widths {widths}")
        if num_classes <= 0 or in_channels <= 0:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        self.blocks = blocks
        self.widths = widths
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.bn = bool(bn)
        self.bias = bool(bias)

        self.conv1 = nn.Conv2d(self.in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=self.bias)
        self.bn1 = _norm(widths[0], self.bn)
        self.relu = nn.ReLU()
        self.stage_names: list[str] = []
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks, widths, strict=False)):
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(in_planes, planes, stride=stride, bn=self.bn, bias=self.bias))
                in_planes = planes
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*stage))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, self.num_classes, bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:  # a fixed Python list: traces to a straight chain
            out = getattr(self, name)(out)
        return self.fc(self.flatten(self.avgpool(out)))

    def arch(self) -> dict:
        """JSON-serialisable architecture, stored in checkpoint metadata."""
        return {"type": "resnet", "blocks": list(self.blocks), "widths": list(self.widths), "bn": self.bn,
                "bias": self.bias, "num_classes": self.num_classes, "in_channels": self.in_channels}

    @classmethod
    def from_arch(cls, arch: dict) -> ResNet:
        if arch.get("type") != "resnet":
            raise ValueError(f"not a ResNet architecture: {arch!r}")
        return cls(arch["blocks"], arch["widths"], num_classes=int(arch.get("num_classes", 10)),
                   in_channels=int(arch.get("in_channels", 3)), bn=bool(arch.get("bn", True)),
                   bias=bool(arch.get("bias", False)))

    def extra_repr(self) -> str:
        return f"arch={self.arch()}"


def resnet_widths(name: str, width: float = 1.0) -> tuple[list[int], list[int]]:
    """(blocks, scaled widths) of the named family member."""
    if name not in RESNET_FAMILIES:
        raise ValueError(f"unknown ResNet {name!r}; known: {', '.join(RESNET_FAMILIES)}")
    if not width > 0:
        raise ValueError(f"ResNet width multiplier must be positive, got {width!r}")
    blocks, base = RESNET_FAMILIES[name]
    return list(blocks), [scale_width(c, width) for c in base]


def _named(name: str, width: float, **kwargs) -> ResNet:
    blocks, widths = resnet_widths(name, width)
    return ResNet(blocks, widths, **kwargs)


def resnet18(width: float = 1.0, **kwargs) -> ResNet:
    """4 stages [2, 2, 2, 2], widths 64..512 x ``width``."""
    return _named("resnet18", width, **kwargs)


def resnet34(width: float = 1.0, **kwargs) -> ResNet:
    """4 stages [3, 4, 6, 3], widths 64..512 x ``width``."""
    return _named("resnet34", width, **kwargs)


def resnet20(width: float = 1.0, **kwargs) -> ResNet:
    """3 stages [3, 3, 3], widths 16, 32, 64 x ``width``."""
    return _named("resnet20", width, **kwargs)


def resnet26(width: float = 1.0, **kwargs) -> ResNet:
    """3 stages [4, 4, 4], widths 16, 32, 64 x ``width``."""
    return _named("resnet26", width, **kwargs)


def resnet32(width: float = 1.0, **kwargs) -> ResNet:
    """3 stages [5, 5, 5], widths 16, 32, 64 x ``width``."""
    return _named("resnet32", width, **kwargs)


def resnet50(width: float = 1.0, **kwargs) -> ResNet:
    """3 stages [8, 8, 8], widths 16, 32, 64 x ``width``: the CIFAR [n, n, n] "ResNet50" of the seed-003
    paper (BasicBlocks, depth 6n + 2 = 50), not the ImageNet bottleneck ResNet-50."""
    return _named("resnet50", width, **kwargs)
