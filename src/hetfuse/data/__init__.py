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
from .text import TEXT_TASKS, TextTask, load_text_tasks, train_wordpiece

__all__ = ["TEXT_TASKS", "Dataset", "TextTask", "alignment_samples", "load_cifar", "load_dataset",
           "load_text_tasks", "random_crop_flip", "read_idx", "resolve_data_root", "skill_split", "train_wordpiece"]
