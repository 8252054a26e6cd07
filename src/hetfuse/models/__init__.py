"""Model zoo."""

from .mlp import MLP
from .registry import build_model, model_from_arch, parse_arch

__all__ = ["MLP", "build_model", "model_from_arch", "parse_arch"]
