"""Layer balancing for convolutional networks by adding function-preserving layers (CLAFusion §3.2).

* VGG-like chains (the zoo :class:`~hetfuse.models.vgg.VGG` or an ``nn.Sequential`` of
  ``Conv2d[/BatchNorm2d]/ReLU/pool ... Flatten, Linear ...``): :func:`add_identity_convs` inserts, after
  a conv block that ends in a ReLU, a 3×3 identity convolution (centre tap 1, zero bias) [+ an identity
  BatchNorm2d] + ReLU. Its input is non-negative, so ReLU(I * x) = x exactly.
* ResNets (the zoo :class:`~hetfuse.models.resnet.ResNet` or any model whose stages are ``nn.Sequential``
  of residual blocks ending in ``relu(branch + shortcut)``): :func:`add_zero_blocks` inserts blocks with an
  identity shortcut whose residual branch outputs exactly zero (zero convolutions, neutral BatchNorms),
  so the block computes relu(0 + x) = x for the non-negative stream x.

:func:`balance_cnn` applies either, group by group, from cross-layer alignments
(:mod:`hetfuse.align.cnn`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import HetfuseError
from ..models.resnet import BasicBlock, ResNet
from ..models.vgg import VGG

_PASS_THROUGH = (nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Identity)

__all__ = ["add_identity_convs", "add_zero_blocks", "balance_cnn", "identity_batchnorm", "identity_conv",
           "residual_stages", "zero_residual_block"]


def identity_batchnorm(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A BatchNorm2d like ``bn`` that is exactly the identity in eval mode.

    running_mean 0, weight 1, bias 0 and a running_var for which ``var + eps`` rounds to exactly 1 in
    the BatchNorm's dtype, so ``(x - 0) / sqrt(var + eps) * 1 + 0 == x`` bit for bit.
    """
    new = copy.deepcopy(bn)
    dtype = bn.running_var.dtype if bn.running_var is not None else torch.float32
    var = torch.tensor(1.0 - bn.eps, dtype=dtype)
    for _ in range(64):  # step to the neighbouring float until var + eps is exactly 1
        s = var + bn.eps
        if s.item() == 1.0:
            break
        var = torch.nextafter(var, torch.tensor(0.0 if s.item() > 1.0 else 2.0, dtype=dtype))
    else:  # pragma: no cover - float32/float64 always converge
        raise HetfuseError(f"cannot make an identity BatchNorm with eps={bn.eps}")
    with torch.no_grad():
        if new.running_mean is not None:
            new.running_mean.zero_()
            new.running_var.fill_(var.item())
        if new.affine:
            new.weight.fill_(1.0)
            new.bias.zero_()
        if new.num_batches_tracked is not None:
            new.num_batches_tracked.zero_()
    return new


def identity_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3×3 (padding 1, stride 1) convolution from ``conv``'s output channels to themselves that is
    the identity: centre tap 1, zeros elsewhere, zero bias when ``conv`` has a bias."""
    c = conv.out_channels
    w = conv.weight
    new = nn.Conv2d(c, c, kernel_size=3, padding=1, bias=conv.bias is not None).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.zero_()
        idx = torch.arange(c, device=w.device)
        new.weight[idx, idx, 1, 1] = 1.0
        if new.bias is not None:
            new.bias.zero_()
    return new


def _insert_identity_convs(layers: list[nn.Module], after: Sequence[int]) -> list[nn.Module]:
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    after = sorted(int(k) for k in after)
    if any(k < 0 or k >= len(convs) for k in after):
        raise HetfuseError(f"identity convolutions go after conv layers 0..{len(convs) - 1}, got {after}")
    inserts: dict[int, list[nn.Module]] = {}
    for k in after:
        i = convs[k]
        end, relu = i + 1, False
        while end < len(layers) and isinstance(layers[end], _PASS_THROUGH):
            relu = relu or isinstance(layers[end], nn.ReLU)
            end += 1
        if not relu:
            raise HetfuseError(f"conv layer {k} is not followed by a ReLU: an identity convolution after it would "
                               "not preserve the function")
        bn = next((m for m in layers[i + 1:end] if isinstance(m, nn.BatchNorm2d)), None)
        block: list[nn.Module] = [identity_conv(layers[i])]
        if bn is not None:
            block.append(identity_batchnorm(bn))
        block.append(nn.ReLU())
        inserts.setdefault(end, []).extend(block)
    out: list[nn.Module] = []
    for i in range(len(layers) + 1):
        out.extend(inserts.get(i, []))
        if i < len(layers):
            out.append(copy.deepcopy(layers[i]))
    return out


def add_identity_convs(model: nn.Module, after: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with one identity conv block inserted after each conv layer index in ``after``
    (0-based indices of the original conv layers, in order; repeat an index for several blocks).

    The block goes right after the conv's BatchNorm/ReLU, before any pooling (same pooling group). It is
    a 3×3 identity conv (bias only if that conv has one), an identity BatchNorm2d if that conv is followed by
    one, and a ReLU. Exactly function-preserving (eval mode). ``model``: the zoo :class:`VGG` (returns a VGG
    whose ``arch()`` lists the new layers) or an ``nn.Sequential`` (returns an ``nn.Sequential``).
    """
    if isinstance(model, VGG):
        cfg = model.layer_config()
        conv_pos = [i for i, c in enumerate(cfg) if c != "M"]
        counts: dict[int, int] = {}
        for k in after:
            if not 0 <= int(k) < len(conv_pos):
                raise HetfuseError(f"identity convolutions go after conv layers 0..{len(conv_pos) - 1}, got {list(after)}")
            counts[int(k)] = counts.get(int(k), 0) + 1
        new_cfg: list[int | str] = []
        for i, c in enumerate(cfg):
            new_cfg.append(c)
            if c != "M":
                new_cfg.extend([c] * counts.get(conv_pos.index(i), 0))
        features = _insert_identity_convs(list(model.features), after)
        new = VGG.from_arch(dict(model.arch(), config=new_cfg))  # "depth" follows from the config
        state = nn.Sequential(*features).state_dict()
        full = {f"features.{k}": v for k, v in state.items()}
        full.update({f"classifier.{k}": v for k, v in model.classifier.state_dict().items()})
        p = next(model.parameters())
        new = new.to(device=p.device, dtype=p.dtype)
        new.load_state_dict(full)
        return new.train(model.training)
    if isinstance(model, nn.Sequential):
        return nn.Sequential(*_insert_identity_convs(list(model), after)).train(model.training)
    raise HetfuseError(f"cannot add identity convolutions to {type(model).__name__}: supported are hetfuse's VGG "
                       "and nn.Sequential conv/BN/ReLU/pool chains")


# ----------------------------------------------------------------------------------------------- ResNets


def residual_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The model's residual stages in forward order: ``(stage module name, [block module names])``.

    A stage is an ``nn.Sequential`` whose children are residual blocks (modules containing a residual
    addition), found by tracing.
    """
    from ..align.cnn import residual_units  # shared with the cross-layer alignment

    stages: list[tuple[str, list[str]]] = []
    for stage, block, _node in residual_units(model):
        if not stages or stages[-1][0] != stage:
            stages.append((stage, []))
        stages[-1][1].append(block)
    return stages


def _identity_shortcut_blocks(model: nn.Module, blocks: list[str]) -> list[bool]:
    """Per block: True when its shortcut is the identity (the residual stream has exactly one producer,
    the branch's last conv, inside the block)."""
    from ..graph.trace import describe

    graph = describe(model)
    out = []
    for b in blocks:
        producers = [p for s in graph.spaces if s.stream for p in s.producers if p.startswith(b + ".")]
        out.append(len(producers) == 1)
    return out


def zero_residual_block(block: nn.Module) -> nn.Module:
    """A copy of ``block`` whose residual branch outputs exactly zero: every conv weight and bias 0 and every
    BatchNorm neutral (running mean 0, running var 1, weight 1, bias 0), so BN(0) = 0."""
    new = copy.deepcopy(block)
    with torch.no_grad():
        for m in new.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.zero_()
                    m.running_var.fill_(1.0)
                if m.affine:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
    return new


def add_zero_blocks(model: nn.Module, stage: int | str, positions: int | Sequence[int]) -> nn.Module:
    """A copy of ``model`` with zero residual blocks (identity shortcut, branch output exactly 0) in ``stage``.

    ``stage``: index into :func:`residual_stages` (for the zoo ResNet, ``layer{stage + 1}``) or the stage's
    module name. ``positions``: a count (blocks appended at the end of the stage) or the indices the new
    blocks take in the new stage (distinct, each < old count + number of new blocks). Index 0 is allowed only
    when the stage's first block has an identity shortcut (a downsampling block must stay first).
    For the zoo ResNet the result is a ResNet with ``arch()["blocks"]`` updated.
    """
    stages = residual_stages(model)
    if isinstance(stage, str):
        names = [s for s, _ in stages]
        if stage not in names:
            raise HetfuseError(f"no residual stage {stage!r}; stages: {names}")
        si = names.index(stage)
    else:
        si = int(stage)
        if not 0 <= si < len(stages):
            raise HetfuseError(f"stage index {si} out of range: the model has {len(stages)} residual stages")
    name, blocks = stages[si]
    seq = model.get_submodule(name)
    if not isinstance(seq, nn.Sequential) or len(seq) != len(blocks):
        raise HetfuseError(f"stage {name!r} must be an nn.Sequential of residual blocks")
    n = len(seq)
    if isinstance(positions, int):
        if positions < 0:
            raise HetfuseError(f"cannot add {positions} blocks")
        positions = list(range(n, n + positions))
    pos = sorted(int(p) for p in positions)
    total = n + len(pos)
    if len(set(pos)) != len(pos) or any(p < 0 or p >= total for p in pos):
        raise HetfuseError(f"zero-block positions {list(positions)} must be distinct indices in [0, {total})")
    identity = _identity_shortcut_blocks(model, blocks)
    if pos and pos[0] == 0 and not identity[0]:
        raise HetfuseError(f"stage {name!r} starts with a downsampling block: a zero block cannot go before it")
    if isinstance(model, ResNet):
        w = model.widths[si]
        template: nn.Module = BasicBlock(w, w, stride=1, bn=model.bn, bias=model.bias)
        p = next(model.parameters())
        template = template.to(device=p.device, dtype=p.dtype)
    else:
        idx = [k for k, ok in enumerate(identity) if ok]
        if not idx:
            raise HetfuseError(f"stage {name!r} has no block with an identity shortcut to copy as a zero block")
        template = seq[idx[0]]
    zero = zero_residual_block(template).train(seq.training)
    old = iter(seq)
    new_blocks = [copy.deepcopy(zero) if p in pos else copy.deepcopy(next(old)) for p in range(total)]
    new = copy.deepcopy(model)
    parent, _, attr = name.rpartition(".")
    setattr(new.get_submodule(parent) if parent else new, attr, nn.Sequential(*new_blocks))
    if isinstance(new, ResNet):
        new.blocks = list(new.blocks)
        new.blocks[si] = total
    return new


# ----------------------------------------------------------------------------------------------- from CLA


def balance_cnn(model: nn.Module, groups: list, alignments: Sequence[Sequence[int]], counts: Sequence[int]) -> nn.Module:
    """Balance ``model`` so that group g has ``counts[g]`` units, unit j of group g landing at
    ``alignments[g][j]`` (strictly increasing, see :func:`hetfuse.align.cnn.conv_groups`).

    Conv groups get identity convolutions after their matched convs (the group's first conv must stay
    matched: ``alignments[g][0] == 0``); residual stages get zero blocks at the unmatched positions.
    Hidden fully connected groups must already agree.
    """
    after: list[int] = []
    offset = 0
    stage_index = 0
    zero: list[tuple[int, list[int]]] = []
    for g, a, m in zip(groups, alignments, counts):
        a = [int(v) for v in a]
        n = len(g.units)
        if len(a) != n or any(v < 0 or v >= m for v in a) or any(a[i] >= a[i + 1] for i in range(n - 1)):
            raise HetfuseError(f"group {g.name}: alignment {a} must be {n} strictly increasing indices into {m}")
        if g.kind == "conv":
            if n < m and a[0] != 0:
                raise HetfuseError(f"group {g.name}: identity convolutions go after a matched conv, so the group's "
                                   f"first conv must stay matched (alignment {a})")
            for j in range(n):
                gap = (a[j + 1] if j + 1 < n else m) - a[j] - 1
                after.extend([offset + j] * gap)
            offset += n
        elif g.kind == "block":
            if n < m:
                zero.append((stage_index, [p for p in range(m) if p not in a]))
            stage_index += 1
        elif n != m:
            raise HetfuseError(f"group {g.name}: balancing hidden fully connected layers of convolutional networks "
                               f"is not supported ({n} vs {m} layers)")
    out = model
    if after:
        out = add_identity_convs(out, after)
    for si, pos in zero:
        out = add_zero_blocks(out, si, pos)
    return out
