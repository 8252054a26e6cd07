"""VGG-11/13/16/19 for 32x32 inputs (the CIFAR variant used by CLAFusion).

Layout: ``self.features`` is an ``nn.Sequential`` of ``Conv2d(3x3, padding 1)[, BatchNorm2d], ReLU`` per
convolution and ``MaxPool2d(2)`` per ``M`` of the standard configuration; ``self.classifier`` is
``nn.Sequential(Flatten, Linear(C_last, num_classes))``. After the five 2x2 pools a 32x32 input is a 1x1
map, so the classifier is a single Linear on the last conv's channels (no 4096-wide FC layers and no
adaptive pooling): inputs must be 32..63 pixels on each side for the flattened size to equal ``C_last``.

Channels are ``max(1, round(c * width))`` for each standard channel count ``c``. ``bias`` switches the
biases of every Conv2d and of the Linear (with BatchNorm, ``bias=False`` is the usual choice since the
BN shift makes a conv bias redundant).
"""

from __future__ import annotations

import torch
from torch import nn

# Standard VGG configurations ("M" = 2x2 max pool, "M4" = 4x4 max pool).
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


# The VGGs of the training-free heterogeneous-merging paper: three stages of 4 (VGG13) or 6 (VGG19) convolutions
# at 128, 256 and 512 channels, max-pooled by 4, 4 and 2, then the Linear layer (32x32 inputs -> 1x1).
MERGING_VGG_CONFIGS: dict[int, list[int | str]] = {
    13: [128] * 4 + ["M4"] + [256] * 4 + ["M4"] + [512] * 4 + ["M"],
    19: [128] * 6 + ["M4"] + [256] * 6 + ["M4"] + [512] * 6 + ["M"],
}

_POOLS = {"M": 2, "M4": 4}


def scale_width(c: int, width: float) -> int:
    """Channel count ``c`` scaled by ``width``: ``max(1, round(c * width))``."""
    return max(1, int(round(c * width)))


class VGG(nn.Module):
    """CIFAR-style VGG; see the module docstring for the layout."""

    def __init__(self, depth: int = 11, width: float = 1.0, bn: bool = False, bias: bool = True,
                 num_classes: int = 10, in_channels: int = 3, config: list[int | str] | None = None) -> None:
        super().__init__()
        if config is not None:  # an explicit layer list (e.g. the heterogeneous-merging paper's layout)
            config = [c if c in _POOLS else int(c) for c in config]
            if not config or any(c not in _POOLS and c <= 0 for c in config):
                raise ValueError(f"VGG config must list positive channel counts and 'M'/'M4' pools, got {config!r}")
            depth = sum(1 for c in config if c not in _POOLS) + (1 if any(c == "M4" for c in config) else 3)
            if VGG_CONFIGS.get(depth) == config:
                config = None
        if config is None and depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
        if not width > 0:
            raise ValueError(f"VGG width multiplier must be positive, got {width!r}")
        if num_classes <= 0 or in_channels <= 0:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        self.depth = int(depth)
        self.width = float(width)
        self.bn = bool(bn)
        self.bias = bool(bias)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.config = config  # None: the standard configuration of ``depth``

        layers: list[nn.Module] = []
        c_in = self.in_channels
        for item in self.layer_config():
            if item in _POOLS:
                layers.append(nn.MaxPool2d(kernel_size=_POOLS[item], stride=_POOLS[item]))
                continue
            c_out = scale_width(int(item), self.width)
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=self.bias))
            if self.bn:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c_in, self.num_classes, bias=self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def layer_config(self) -> list[int | str]:
        """Base channel counts and ``"M"`` pools, in order (before width scaling)."""
        return list(VGG_CONFIGS[self.depth] if self.config is None else self.config)

    def layer_config_pools(self) -> list[int]:
        return [_POOLS[c] for c in self.layer_config() if c in _POOLS]

    def channels(self) -> list[int]:
        """Output channels of each convolution, in order."""
        return [m.out_channels for m in self.features if isinstance(m, nn.Conv2d)]

    def arch(self) -> dict:
        """JSON-serialisable architecture, stored in checkpoint metadata."""
        arch = {"type": "vgg", "depth": self.depth, "width": self.width, "bn": self.bn, "bias": self.bias,
                "num_classes": self.num_classes, "in_channels": self.in_channels}
        if self.config is not None:  # optional key: an explicit (non-standard) layer list
            arch["config"] = list(self.config)
        return arch

    @classmethod
    def from_arch(cls, arch: dict) -> VGG:
        if arch.get("type") != "vgg":
            raise ValueError(f"not a VGG architecture: {arch!r}")
        return cls(depth=int(arch["depth"]), width=float(arch.get("width", 1.0)), bn=bool(arch.get("bn", False)),
                   bias=bool(arch.get("bias", True)), num_classes=int(arch.get("num_classes", 10)),
                   in_channels=int(arch.get("in_channels", 3)), config=arch.get("config"))

    def extra_repr(self) -> str:
        return f"arch={self.arch()}"
