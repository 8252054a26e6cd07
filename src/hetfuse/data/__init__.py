"""Data sets, splits and alignment samples."""

from .datasets import (
    Dataset,
    alignment_samples,
    load_dataset,
    read_idx,
    resolve_data_root,
    skill_split,
)

__all__ = ["Dataset", "alignment_samples", "load_dataset", "read_idx", "resolve_data_root", "skill_split"]
