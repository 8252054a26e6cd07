"""The default repair: the BN reset where there is BatchNorm, REPAIR on the BatchNorm-free layers; and none."""

from __future__ import annotations

from ..registry import register
from .base import Repair, has_batchnorm
from .bn_reset import reset_batchnorm
from .repair import repair_spaces, repairable_spaces


@register
class AutoRepair(Repair):
    rank = 0
    name = "auto"
    description = "bn-reset where the network has BatchNorm, REPAIR on its BatchNorm-free layers (default)"
    reference = "Jordan et al. 2022 (REPAIR); ZipIt!"

    def repair(self, model, ctx):
        bn = has_batchnorm(model)
        if bn:
            reset_batchnorm(model, ctx.x)
        spaces = repairable_spaces(ctx.graph)
        if spaces:
            model = repair_spaces(model, ctx.graph, ctx.x, ctx.target_stats, spaces)
            if bn:  # corrected layers change what later BatchNorms see
                reset_batchnorm(model, ctx.x)
        return model.eval()


@register
class NoRepair(Repair):
    rank = 3
    name = "none"
    description = "leave the fused network as combined"

    def repair(self, model, ctx):
        return model.eval()
