"""Architecture strings and architecture dicts -> models.

Architecture strings (stable syntax, ``name[:options]``):

* ``mlp:400,200,100`` - MLP with these hidden widths; input/output sizes come from the data set and the
  Linear biases from the ``bias`` keyword.
* ``vgg11|vgg13|vgg16|vgg19[:opts]`` - CIFAR VGG (:class:`~hetfuse.models.vgg.VGG`); defaults
  ``w=1``, no BatchNorm, biases on.
* ``mvgg13|mvgg19[:opts]`` - the VGGs of the training-free heterogeneous-merging paper (three stages of 4 or 6
  convolutions at 128/256/512 x ``w``, max-pools 4, 4, 2, one Linear); defaults ``w=1``, BatchNorm, no biases.
* ``resnet18|resnet34|resnet20|resnet26|resnet32|resnet50[:opts]`` - CIFAR ResNet
  (:class:`~hetfuse.models.resnet.ResNet`); defaults ``w=1``, BatchNorm, no biases.

Options of the conv models, comma-separated: ``w=<float>`` (width multiplier), ``bn`` / ``nobn``,
``bias`` / ``nobias``. E.g. ``vgg11:w=0.25,bn``, ``vgg13:w=2``, ``resnet20:w=1,nobn``. For conv models the
``bias`` keyword of :func:`parse_arch` is not used (the spec's options decide), the class count is
``output_dim`` and the input channels are ``input_shape[0]`` (default 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .mlp import MLP
from .resnet import RESNET_FAMILIES, ResNet, resnet_widths
from .vgg import MERGING_VGG_CONFIGS, VGG, VGG_CONFIGS

# name -> one-line description, for docs and error messages.
ZOO: dict[str, str] = {
    "mlp": "MLP, 'mlp:W1,W2,...' hidden widths (Linear + ReLU)",
    **{f"vgg{d}": f"CIFAR VGG-{d} (single Linear classifier, 32x32 inputs); options w=,bn,nobias"
       for d in sorted(VGG_CONFIGS)},
    **{f"mvgg{d}": (f"VGG{d} of the heterogeneous-merging paper: 3 stages of {(d - 1) // 3} convs at 128/256/512 x w, "
                    "max-pool 4, 4, 2, one Linear; BatchNorm by default; options w=,nobn,bias")
       for d in sorted(MERGING_VGG_CONFIGS)},
    **{name: (f"CIFAR ResNet {blocks} BasicBlocks, widths {widths} x w; options w=,nobn,bias"
              + (" (the [n,n,n] family, n=8; not the bottleneck ResNet-50)" if name == "resnet50" else ""))
       for name, (blocks, widths) in RESNET_FAMILIES.items()},
}

_OPTIONS = "w=<float>, bn, nobn, bias, nobias"


def list_archs() -> list[str]:
    """Example architecture strings, one per zoo entry."""
    return ["mlp:400,200,100"] + [f"vgg{d}:w=1,bn" for d in sorted(VGG_CONFIGS)] + \
        [f"mvgg{d}:w=0.125" for d in sorted(MERGING_VGG_CONFIGS)] + \
        [f"{name}:w=1" for name in RESNET_FAMILIES]


def _parse_options(spec: str, args: str, *, bn: bool, bias: bool) -> tuple[float, bool, bool]:
    width: float | None = None
    seen: set[str] = set()
    for raw in args.split(","):
        opt = raw.strip().lower()
        if not opt:
            continue
        key = "w" if opt.startswith("w=") else ("bn" if opt in ("bn", "nobn") else
                                                 "bias" if opt in ("bias", "nobias") else None)
        if key is None:
            raise ValueError(f"unknown option {raw.strip()!r} in {spec!r}; valid options: {_OPTIONS}")
        if key in seen:
            raise ValueError(f"option {key!r} given twice in {spec!r}")
        seen.add(key)
        if key == "w":
            try:
                width = float(opt[2:])
            except ValueError:
                raise ValueError(f"bad width {opt[2:]!r} in {spec!r}: expected e.g. 'w=0.5'") from None
            if not (math.isfinite(width) and width > 0):
                raise ValueError(f"bad width {opt[2:]!r} in {spec!r}: must be a positive number")
        elif key == "bn":
            bn = opt == "bn"
        else:
            bias = opt == "bias"
    return (1.0 if width is None else width), bn, bias


def _in_channels(input_shape: Sequence[int] | None) -> int:
    if input_shape is None:
        return 3
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    return shape[0]


def parse_arch(spec: str, *, input_dim: int, output_dim: int, bias: bool = False,
               input_shape: Sequence[int] | None = None) -> dict:
    """Parse an architecture string (see the module docstring) into an architecture dict.

    ``mlp:400,200,100`` -> hidden widths 400, 200, 100, with ``input_dim``/``output_dim``/``bias``.
    ``vgg11:w=0.25,bn`` -> ``{"type": "vgg", "depth": 11, "width": 0.25, "bn": True, "bias": True,
    "num_classes": output_dim, "in_channels": 3}``; ``resnet20:w=4`` -> ``{"type": "resnet", "blocks":
    [3, 3, 3], "widths": [64, 128, 256], "bn": True, "bias": False, ...}``.
    """
    name, _, args = spec.partition(":")
    name = name.strip().lower()
    if name == "mlp":
        try:
            hidden = [int(x) for x in args.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"bad MLP widths in {spec!r}: expected e.g. 'mlp:400,200,100'") from None
        if not hidden or any(h <= 0 for h in hidden):
            raise ValueError(f"bad MLP widths in {spec!r}: need at least one positive hidden width")
        return {"type": "mlp", "input_dim": int(input_dim), "hidden": hidden, "output_dim": int(output_dim),
                "bias": bool(bias)}
    if name.startswith("vgg") and name[3:].isdigit() and int(name[3:]) in VGG_CONFIGS:
        width, bn, has_bias = _parse_options(spec, args, bn=False, bias=True)
        in_ch = _in_channels(input_shape)
        if input_shape is not None and not all(32 <= int(s) < 64 for s in tuple(input_shape)[1:]):
            raise ValueError(f"{name} needs inputs of 32..63 pixels per side (5 pools down to 1x1), "
                             f"got input shape {tuple(input_shape)}")
        return {"type": "vgg", "depth": int(name[3:]), "width": width, "bn": bn, "bias": has_bias,
                "num_classes": int(output_dim), "in_channels": in_ch}
    if name.startswith("mvgg") and name[4:].isdigit() and int(name[4:]) in MERGING_VGG_CONFIGS:
        width, bn, has_bias = _parse_options(spec, args, bn=True, bias=False)
        if input_shape is not None and not all(32 <= int(s) < 64 for s in tuple(input_shape)[1:]):
            raise ValueError(f"{name} needs inputs of 32..63 pixels per side (pools of 4, 4, 2 down to 1x1), "
                             f"got input shape {tuple(input_shape)}")
        return {"type": "vgg", "depth": int(name[4:]), "width": width, "bn": bn, "bias": has_bias,
                "num_classes": int(output_dim), "in_channels": _in_channels(input_shape),
                "config": list(MERGING_VGG_CONFIGS[int(name[4:])])}
    if name in RESNET_FAMILIES:
        width, bn, has_bias = _parse_options(spec, args, bn=True, bias=False)
        blocks, widths = resnet_widths(name, width)
        return {"type": "resnet", "blocks": blocks, "widths": widths, "bn": bn, "bias": has_bias,
                "num_classes": int(output_dim), "in_channels": _in_channels(input_shape)}
    raise ValueError(f"unknown architecture {name!r} in {spec!r}; known: mlp:W1,W2,..., "
                     f"{', '.join(n for n in ZOO if n != 'mlp')} (options: {_OPTIONS})")


def model_from_arch(arch: dict) -> nn.Module:
    """Build a model from its architecture dict."""
    arch = dict(arch)
    kind = arch.get("type")
    if kind == "mlp":
        model = MLP.from_arch(arch)
    elif kind == "vgg":
        model = VGG.from_arch(arch)
    elif kind == "resnet":
        model = ResNet.from_arch(arch)
    else:
        raise ValueError(f"unknown architecture type {kind!r}; known: mlp, vgg, resnet")
    return model


def build_model(spec: str, *, input_dim: int, output_dim: int, bias: bool = False,
                input_shape: Sequence[int] | None = None) -> nn.Module:
    return model_from_arch(parse_arch(spec, input_dim=input_dim, output_dim=output_dim, bias=bias,
                                      input_shape=input_shape))
