"""Training recipes: the optimiser defaults of ``hetfuse train`` by data set family (and ZipIt!'s recipe), resolved
against the flags a user gave."""

from __future__ import annotations

from ..errors import HetfuseError
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


def train_from_spec(ds, arch_spec: str, *, head, settings: dict, epochs: int, seed: int = 0, bias: bool = False,
                    split: str = "all", split_seed: int = 0, classes=None, channels_last: bool = False,
                    warmup_epochs: float | None = None, progress: bool = True):
    """A zoo model (``arch_spec``, initialised with ``torch.manual_seed(seed)``) trained on the data set ``ds`` —
    the examples of ``classes`` or of the skill ``split`` — with the hyper-parameters ``settings`` (see
    :func:`train_settings`) and the output ``head``; returns ``(model, metadata)``, the metadata holding the
    architecture, the settings, the per-epoch history and the test accuracy (and, for a class subset, the accuracy
    on those classes)."""
    import torch

    from ..data import skill_split
    from ..models import model_from_arch, parse_arch
    from .heads import task_metrics
    from .trainer import predict_logits, train_model

    try:
        arch = parse_arch(arch_spec, input_dim=ds.input_dim, output_dim=head.outputs, bias=bias,
                          input_shape=ds.input_shape)
    except ValueError as e:
        raise HetfuseError(f"--arch {arch_spec!r}: {e}") from None
    torch.manual_seed(seed)
    model = model_from_arch(arch)
    conv = arch.get("type") != "mlp"
    if settings["augment"] and not conv:
        raise HetfuseError(f"--augment crops images, but {arch_spec} is an MLP; pass --no-augment")

    def layout(x):
        return x if conv or x.ndim == 2 else x.reshape(x.shape[0], -1)

    if classes is not None:
        idx = torch.nonzero(torch.isin(ds.y_train, torch.tensor(classes))).flatten()
    else:
        idx = skill_split(ds.y_train, split, seed=split_seed)
    hist = train_model(model, layout(ds.x_train)[idx], ds.y_train[idx], epochs=epochs, lr=settings["lr"],
                       momentum=settings["momentum"], batch_size=settings["batch_size"],
                       weight_decay=settings["weight_decay"], seed=seed, progress=progress, desc=f"train {arch_spec}",
                       augment=settings["augment"], schedule=settings["schedule"],
                       label_smoothing=settings["label_smoothing"], nesterov=settings["nesterov"],
                       channels_last=channels_last, record_time=True, head=head, warmup_epochs=warmup_epochs)
    model = model.to(memory_format=torch.contiguous_format)
    scores = head.scores(predict_logits(model, layout(ds.x_test)))
    metrics = task_metrics(scores, ds.y_test, [classes] if classes is not None else [list(range(ds.num_classes))])
    meta = {"arch_spec": arch_spec, "split": split, "split_seed": split_seed, "epochs": epochs, **settings,
            "channels_last": bool(channels_last), "seed": seed, "train_examples": int(len(idx)),
            "test_accuracy": metrics["joint"], "head": head.to_dict(), "classes": classes,
            "train_seconds": float(sum(h["seconds"] for h in hist)), "history": hist}
    if classes is not None:
        meta["task_accuracy"] = metrics["tasks"][0]
    if ds.note:
        meta["data_note"] = ds.note
    return model, meta
