"""Data sets, splits and alignment samples."""

from .augment import random_crop_flip
from .cifar import load_cifar
from .datasets import (
    Dataset,
    alignment_samples,
    load_dataset,
    read_idx,
    resolve_data_root,
    skill_split,
)

__all__ = ["Dataset", "alignment_samples", "load_cifar", "load_dataset", "random_crop_flip", "read_idx",
           "resolve_data_root", "skill_split"]
