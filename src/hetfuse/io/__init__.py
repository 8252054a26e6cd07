"""Checkpoint input/output (safetensors; structure recorded as data)."""

from .checkpoint import load_checkpoint, load_model, save_checkpoint, save_model

__all__ = ["load_checkpoint", "load_model", "save_checkpoint", "save_model"]
