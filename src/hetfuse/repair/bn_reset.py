"""Recompute every BatchNorm's running statistics on the repair samples (the "BN reset" of REPAIR / ZipIt)."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register
from .base import Repair


ONE_BATCH_BYTES = 1 << 30  # the reset runs all samples as one batch when the network's values fit in this


def _per_sample_elements(model: nn.Module, x1: torch.Tensor) -> int:
    """The largest number of elements one sample's value takes at any layer of ``model``."""
    sizes = [x1[0].numel()]
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel() if isinstance(out, torch.Tensor)
                                                                      else 0))
             for m in model.modules() if not list(m.children())]
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x1)
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return max(sizes)


@torch.no_grad()
def reset_batchnorm(model: nn.Module, x: torch.Tensor, *, batch_size: int | None = None,
                    only: list[nn.Module] | None = None, train_all: bool = False) -> nn.Module:
    """Recompute every BatchNorm's running statistics (or those in ``only``) on ``x``: one pass with those
    BatchNorms in training mode (normalising with batch statistics, as in training), each one's running mean
    and unbiased variance set to the exact statistics of everything it saw. All of ``x`` is one batch (so the
    result does not depend on the order of the samples) unless the network's values would not fit in 1 GiB,
    then batches of ``batch_size`` (default 500). Dropout stays off; the model ends in eval mode.
    ``train_all``: every BatchNorm normalises with batch statistics during the pass (as in a full reset), even
    those not in ``only`` (their running statistics then change too)."""
    all_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = list(all_norms)
    if only is not None:
        keep = {id(m) for m in only}
        norms = [m for m in norms if id(m) in keep]
    sums: dict[int, list] = {id(m): [0, 0.0, 0.0] for m in norms}

    def record(module, args):
        z = args[0].detach().to(torch.float64)
        dims = [0] + list(range(2, z.dim()))
        acc = sums[id(module)]
        acc[0] += z.numel() // z.shape[1]
        acc[1] = acc[1] + z.sum(dims)
        acc[2] = acc[2] + (z * z).sum(dims)

    dev = next(iter(model.parameters())).device
    if batch_size is None:
        per = _per_sample_elements(model, x[:1].to(dev))
        batch_size = x.shape[0] if 4 * 8 * per * x.shape[0] <= ONE_BATCH_BYTES else 500
    hooks = [m.register_forward_pre_hook(record) for m in norms]
    model.eval()
    for m in (all_norms if train_all else norms):
        m.train()
    batches = 0
    try:
        for start in range(0, x.shape[0], batch_size):
            model(x[start:start + batch_size].to(dev))
            batches += 1
    finally:
        for h in hooks:
            h.remove()
        model.eval()
    for m in norms:
        n, s1, s2 = sums[id(m)]
        if n == 0:
            continue
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0.0) * (n / max(n - 1, 1))
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(batches)
    return model


@register
class BNReset(Repair):
    rank = 1
    name = "bn-reset"
    description = "recompute every BatchNorm's running statistics on the repair samples"
    reference = "Jordan et al. 2022 (REPAIR); ZipIt!"

    def repair(self, model, ctx):
        return reset_batchnorm(model, ctx.x)
