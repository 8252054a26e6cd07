"""Architecture strings (``mlp:400,200,100``) and architecture dicts -> models."""

from __future__ import annotations

from torch import nn

from .mlp import MLP


def parse_arch(spec: str, *, input_dim: int, output_dim: int, bias: bool = False) -> dict:
    """Parse a CLI architecture string into an architecture dict.

    ``mlp:400,200,100`` -> hidden widths 400, 200, 100. Input and output sizes come from the data set.
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
    raise ValueError(f"unknown architecture {name!r} in {spec!r}; known: mlp:W1,W2,...")


def model_from_arch(arch: dict) -> nn.Module:
    kind = arch.get("type")
    if kind == "mlp":
        return MLP.from_arch(arch)
    raise ValueError(f"unknown architecture type {kind!r}")


def build_model(spec: str, *, input_dim: int, output_dim: int, bias: bool = False) -> nn.Module:
    return model_from_arch(parse_arch(spec, input_dim=input_dim, output_dim=output_dim, bias=bias))
