"""Evaluating checkpoints on a data set: loading them, checking they fit the data, the accuracy tables of the
command line and of the fusion report (each model, their prediction ensemble, a fused model; joint and per-task
accuracy for class-split task models)."""

from __future__ import annotations

from .errors import HetfuseError


def load_models(paths: list[str], allow_pickle: bool = False):
    """``(models, metadata)`` of the checkpoints at ``paths``."""
    from .io import load_checkpoint

    models, metas = [], []
    for p in paths:
        m, meta = load_checkpoint(p, allow_pickle=allow_pickle)
        models.append(m)
        metas.append(meta)
    return models, metas


def checkpoint_head(meta: dict, ds):
    """The :class:`~hetfuse.train.OutputHead` a checkpoint's metadata records (default: class logits)."""
    from .train import OutputHead

    return OutputHead.from_dict(meta.get("head"), ds.num_classes)


def head_meta(meta: dict) -> dict:
    """The head entries of a checkpoint's metadata, to carry over to a model made from it."""
    return {k: meta[k] for k in ("head", "head_classes") if k in meta}


def check_dims(models, ds, paths, metas=None) -> None:
    """Refuse, naming the file, a model whose input or output size does not fit the data set ``ds``."""
    from .branches import MultiBranch
    from .graph import describe
    from .multihead import MultiHead

    for k, (m, p) in enumerate(zip(models, paths, strict=False)):
        head = checkpoint_head(metas[k] if metas else {}, ds)
        if isinstance(m, MultiHead):
            continue  # its trunk reads the data; its heads' outputs are checked when scored
        g = describe(m.path(0) if isinstance(m, MultiBranch) else m)  # a branch and the tail: its sizes
        conv = g.image_input
        want = ds.input_shape[0] if conv else ds.input_dim
        unit = "input channels" if conv else "input features"
        if g.input_dim != want or g.output_dim != head.outputs:
            outs = f"{ds.num_classes} classes" if head.kind == "linear" else f"a {head.dim}-d embedding head"
            raise HetfuseError(f"{p}: model maps {g.input_dim} inputs to {g.output_dim} outputs, but {ds.name} has "
                               f"{want} {unit} and {outs}")


def fused_head(metas: list[dict], ds, paths) -> dict:
    """The output head of a fused model (the inputs' common head, over the union of their classes) and, for a
    multi-head result, the classes of each input."""
    heads = [checkpoint_head(m, ds) for m in metas]
    keys = {(h.kind, h.dim, h.seed, h.scale) if h.kind == "embed" else ("linear",) for h in heads}
    if len(keys) > 1:
        kinds = ", ".join(h.kind for h in heads)
        raise HetfuseError(f"the checkpoints score their outputs differently ({kinds} heads, "
                           f"{paths}): fuse models that share their output space")
    classes = None if any(h.classes is None for h in heads) else sorted({c for h in heads for c in h.classes})
    head = dict(heads[0].to_dict(), classes=classes)
    return {"head": head, "head_classes": [h.classes if h.classes is not None else list(range(h.num_classes))
                                           for h in heads]}


def fusion_accuracy(paths, models, metas, fused, fused_head_meta: dict, ds, weights) -> dict:
    """The fusion report's accuracy table on the test split: each input, their prediction ensemble, the fused model
    (joint and per-task accuracy when the inputs were trained on different classes)."""
    from .config import normalize_weights
    from .train import OutputHead, ensemble_accuracy, ensemble_task_metrics, model_task_metrics

    heads = [checkpoint_head(m, ds) for m in metas]
    fhead = OutputHead.from_dict(fused_head_meta.get("head"), ds.num_classes)
    tasks = [list(t) for t in fused_head_meta["head_classes"]]
    split = len({tuple(sorted(t)) for t in tasks}) > 1
    tasks = tasks if split else [list(range(ds.num_classes))]
    x, y = ds.x_test, ds.y_test
    rows = []
    for p, m, h, meta in zip(paths, models, heads, metas, strict=True):
        r = model_task_metrics(m, h, x, y, tasks, meta.get("head_classes"))
        rows.append([p, r["joint"], *r["tasks"], r["per_task_avg"]] if split else [p, r["joint"]])
    w = normalize_weights(weights, len(models))
    if split:
        ens = ensemble_task_metrics(models, heads, x, y, tasks, [m.get("head_classes") for m in metas])
        rows.append(["ensemble (each model on its classes)", ens["joint"], *ens["tasks"], ens["per_task_avg"]])
    else:
        rows.append([f"ensemble (weights {w})", ensemble_accuracy(models, w, x, y)])
    r = model_task_metrics(fused, fhead, x, y, tasks, fused_head_meta.get("head_classes"))
    rows.append(["fused", r["joint"], *r["tasks"], r["per_task_avg"]] if split else ["fused", r["joint"]])
    rows = [[row[0], *(f"{v:.2f}" for v in row[1:])] for row in rows]
    header = ["model", "joint"] + [f"task {k + 1}" for k in range(len(tasks))] + ["per-task avg"] if split else \
        ["model", "test accuracy (%)"]
    note = (f"{ds.name} test split ({y.numel()} images)" + ("; joint = argmax over every class, task k = argmax over "
                                                         "task k's classes on its images" if split else ""))
    return {"header": header, "rows": rows, "note": note}


def accuracies(models, ds, weights=None, ensemble: bool = False) -> tuple[list[float], float | None, list[float]]:
    """Test accuracy of each model and (``ensemble``) of their weighted prediction ensemble; returns (accuracies,
    ensemble accuracy or None, the normalised weights)."""
    from .config import normalize_weights
    from .train import accuracy, ensemble_accuracy

    accs = [accuracy(m, ds.x_test, ds.y_test) for m in models]
    w = normalize_weights(weights, len(models))
    ens = ensemble_accuracy(models, w, ds.x_test, ds.y_test) if ensemble else None
    return accs, ens, w


def task_accuracies(models, metas, ds, tasks, ensemble: bool = False) -> tuple[list[dict], dict | None]:
    """Joint and per-task test accuracy of each class-split task model, and of their ensemble (each class scored by
    the model trained on it)."""
    from .train import ensemble_task_metrics, model_task_metrics

    heads = [checkpoint_head(m, ds) for m in metas]
    x = ds.x_test
    rows = [model_task_metrics(m, h, x, ds.y_test, tasks, meta.get("head_classes"))
            for m, h, meta in zip(models, heads, metas, strict=True)]
    ens = ensemble_task_metrics(models, heads, x, ds.y_test, tasks, [m.get("head_classes") for m in metas]) \
        if ensemble else None
    return rows, ens
