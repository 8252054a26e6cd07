"""Training recipes: the optimiser defaults of ``hetfuse train`` by data set family (and ZipIt!'s recipe), resolved
against the flags a user gave."""

from __future__ import annotations

from .trainer import ZIPIT_RECIPE

# CIFAR: SGD + Nesterov momentum 0.9, one-cycle learning rate peaking at 0.1 per batch, weight decay 5e-4, label
# smoothing 0.1, batch 128, random crop (padding 4) + flip.
CIFAR_TRAIN_DEFAULTS = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "batch_size": 128, "weight_decay": 5e-4,
                        "schedule": "onecycle", "label_smoothing": 0.1, "augment": True}
# MNIST, IDX, digits: the CLAFusion paper's plain SGD.
PLAIN_TRAIN_DEFAULTS = {"lr": 0.01, "momentum": 0.5, "nesterov": False, "batch_size": 64, "weight_decay": 0.0,
                        "schedule": "constant", "label_smoothing": 0.0, "augment": False}


def train_settings(dataset: str, recipe: str = "default", **given) -> dict:
    """The training hyper-parameters for ``dataset``: each one given (not None) as is, else the recipe's
    (``zipit``) or the data set family's default."""
    cifar = dataset.strip().lower() in ("cifar10", "cifar100")
    defaults = CIFAR_TRAIN_DEFAULTS if cifar else PLAIN_TRAIN_DEFAULTS
    if recipe == "zipit":
        defaults = dict(ZIPIT_RECIPE, augment=ZIPIT_RECIPE["augment"] and cifar)
    return {k: (given[k] if given.get(k) is not None else v) for k, v in defaults.items()}
