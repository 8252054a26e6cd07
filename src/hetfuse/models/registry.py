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

Pre-LN transformer encoders (:mod:`hetfuse.models.transformer`), options ``key=value``, comma-separated, each at
most once:

* ``vit[:depth=4,dim=64,heads=4,patch=4,mlp=128,pool=cls|mean,qkv=3|1]`` - Vision Transformer
  (:class:`~hetfuse.models.transformer.ViT`) on ``input_shape`` images (C, H, W; default (3, 32, 32); H and W
  must be divisible by ``patch``); defaults ``depth=4``, ``dim=64``, ``heads=4``, ``patch=4``, ``mlp=4*dim``,
  ``pool=cls``, ``qkv=3`` (separate q, k, v Linears; ``qkv=1``: one fused Linear). E.g. ``vit:depth=2,dim=32``,
  ``vit:patch=7,pool=mean,qkv=1`` (MNIST: 28 = 4 x 7).
* ``bert[:depth=2,dim=64,heads=4,vocab=1000,seq=32,mlp=128,pool=cls|mean]`` - BERT-style text encoder
  (:class:`~hetfuse.models.transformer.BertEncoder`) on token ids ``N x seq`` (int64); defaults ``depth=2``,
  ``dim=64``, ``heads=4``, ``vocab=1000``, ``seq=32`` (or the length of a one-dimensional ``input_shape``),
  ``mlp=4*dim``, ``pool=cls``. An image ``input_shape`` is refused.

``dim`` must be divisible by ``heads``. The class count is ``output_dim``; ``input_dim`` and the ``bias`` keyword
are not used (every Linear has a bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .mlp import MLP
from .resnet import RESNET_FAMILIES, ResNet, resnet_widths
from .transformer import POOLS, BertEncoder, ViT
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
    "vit": ("pre-LN Vision Transformer on C x H x W images (patch conv, learned positions); options depth=,dim=,"
            "heads=,patch=,mlp=,pool=cls|mean,qkv=3|1"),
    "bert": ("pre-LN BERT-style text encoder on N x seq token ids (embedding, learned positions); options depth=,"
             "dim=,heads=,vocab=,seq=,mlp=,pool=cls|mean"),
}

_OPTIONS = "w=<float>, bn, nobn, bias, nobias"

# Transformer options: key -> default (None: computed, mlp = 4 * dim).
_VIT_DEFAULTS: dict[str, int | str | None] = {"depth": 4, "dim": 64, "heads": 4, "patch": 4, "mlp": None,
                                               "pool": "cls", "qkv": 3}
_BERT_DEFAULTS: dict[str, int | str | None] = {"depth": 2, "dim": 64, "heads": 4, "vocab": 1000, "seq": 32,
                                                "mlp": None, "pool": "cls"}


def list_archs() -> list[str]:
    """Example architecture strings, one per zoo entry."""
    return ["mlp:400,200,100"] + [f"vgg{d}:w=1,bn" for d in sorted(VGG_CONFIGS)] + \
        [f"mvgg{d}:w=0.125" for d in sorted(MERGING_VGG_CONFIGS)] + \
        [f"{name}:w=1" for name in RESNET_FAMILIES] + \
        ["vit:depth=4,dim=64,heads=4,patch=4,mlp=128", "bert:depth=2,dim=64,heads=4,vocab=1000,seq=32,mlp=128"]


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


def _transformer_options(spec: str, args: str, defaults: dict) -> dict:
    """``key=value`` options of a transformer spec over ``defaults`` (ints except ``pool``; ``mlp`` defaults to
    ``4 * dim``)."""
    valid = ", ".join(f"{k}=" + ("|".join(POOLS) if k == "pool" else "3|1" if k == "qkv" else "<int>")
                      for k in defaults)
    opts = dict(defaults)
    seen: set[str] = set()
    for raw in args.split(","):
        opt = raw.strip().lower()
        if not opt:
            continue
        key, eq, value = (part.strip() for part in opt.partition("="))
        if key not in defaults or not eq:
            raise ValueError(f"unknown option {raw.strip()!r} in {spec!r}; valid options: {valid}")
        if key in seen:
            raise ValueError(f"option {key!r} given twice in {spec!r}")
        seen.add(key)
        if key == "pool":
            if value not in POOLS:
                raise ValueError(f"bad pool {value!r} in {spec!r}: expected one of {', '.join(POOLS)}")
            opts[key] = value
            continue
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"bad {key} {value!r} in {spec!r}: expected an integer, e.g. '{key}=4'") from None
        if number <= 0:
            raise ValueError(f"bad {key} {value!r} in {spec!r}: must be a positive integer")
        if key == "qkv" and number not in (1, 3):
            raise ValueError(f"bad qkv {value!r} in {spec!r}: 3 (separate q, k, v Linears) or 1 (one fused Linear)")
        opts[key] = number
    if opts["mlp"] is None:
        opts["mlp"] = 4 * opts["dim"]
    if opts["dim"] % opts["heads"]:
        raise ValueError(f"dim {opts['dim']} is not divisible by heads {opts['heads']} in {spec!r}")
    return opts


def _parse_vit(spec: str, args: str, output_dim: int, input_shape: Sequence[int] | None) -> dict:
    opts = _transformer_options(spec, args, _VIT_DEFAULTS)
    in_ch = _in_channels(input_shape)
    size = [32, 32] if input_shape is None else [int(s) for s in tuple(input_shape)[1:]]
    if size[0] % opts["patch"] or size[1] % opts["patch"]:
        raise ValueError(f"vit patch {opts['patch']} does not divide the image size {size[0]}x{size[1]} "
                         f"in {spec!r}")
    return {"type": "vit", **opts, "num_classes": int(output_dim), "in_channels": in_ch, "image_size": size}


def _parse_bert(spec: str, args: str, output_dim: int, input_shape: Sequence[int] | None) -> dict:
    defaults = dict(_BERT_DEFAULTS)
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 1 or shape[0] <= 0:
            raise ValueError(f"bert takes token ids (N x seq), not inputs of shape {shape} ({spec!r})")
        defaults["seq"] = shape[0]
    opts = _transformer_options(spec, args, defaults)
    if input_shape is not None and opts["seq"] != defaults["seq"]:
        raise ValueError(f"bert seq={opts['seq']} but the inputs hold {defaults['seq']} tokens ({spec!r})")
    return {"type": "bert", **opts, "num_classes": int(output_dim)}


def parse_arch(spec: str, *, input_dim: int, output_dim: int, bias: bool = False,
               input_shape: Sequence[int] | None = None) -> dict:
    """Parse an architecture string (see the module docstring) into an architecture dict.

    ``mlp:400,200,100`` -> hidden widths 400, 200, 100, with ``input_dim``/``output_dim``/``bias``.
    ``vgg11:w=0.25,bn`` -> ``{"type": "vgg", "depth": 11, "width": 0.25, "bn": True, "bias": True,
    "num_classes": output_dim, "in_channels": 3}``; ``resnet20:w=4`` -> ``{"type": "resnet", "blocks":
    [3, 3, 3], "widths": [64, 128, 256], "bn": True, "bias": False, ...}``; ``vit:depth=2`` -> ``{"type": "vit",
    "depth": 2, "dim": 64, "heads": 4, "patch": 4, "mlp": 256, "pool": "cls", "qkv": 3, "num_classes": output_dim,
    "in_channels": 3, "image_size": [32, 32]}``; ``bert`` -> ``{"type": "bert", "depth": 2, "dim": 64, "heads": 4,
    "vocab": 1000, "seq": 32, "mlp": 256, "pool": "cls", "num_classes": output_dim}``.
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
    if name == "vit":
        return _parse_vit(spec, args, output_dim, input_shape)
    if name == "bert":
        return _parse_bert(spec, args, output_dim, input_shape)
    raise ValueError(f"unknown architecture {name!r} in {spec!r}; known: mlp:W1,W2,..., "
                     f"{', '.join(n for n in ZOO if n != 'mlp')} (options of the conv models: {_OPTIONS}; "
                     "vit and bert take key=value options)")


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
    elif kind == "vit":
        model = ViT.from_arch(arch)
    elif kind == "bert":
        model = BertEncoder.from_arch(arch)
    else:
        raise ValueError(f"unknown architecture type {kind!r}; known: mlp, vgg, resnet, vit, bert")
    return model


def build_model(spec: str, *, input_dim: int, output_dim: int, bias: bool = False,
                input_shape: Sequence[int] | None = None) -> nn.Module:
    return model_from_arch(parse_arch(spec, input_dim=input_dim, output_dim=output_dim, bias=bias,
                                      input_shape=input_shape))
