"""Finetuning and knowledge distillation: a held-out validation split, the best epoch kept, a per-epoch log,
resumable, and the same code on one process or many (torch DDP).

Held-out split: a seeded 10% (``val_fraction``) of the training set — the last tenth of a permutation drawn with
``torch.Generator().manual_seed(split_seed)`` — never trained on; the checkpoint kept is the epoch with the best
accuracy on it (the test set is never looked at).

Distributed: run the same command under ``torchrun --nproc_per_node=K --no-python hetfuse finetune ...`` (gloo on
CPU, NCCL on GPU). Every epoch's permutation of the training examples is cut into global batches of
``batch_size``; ``torch.utils.data.DistributedSampler`` (no shuffling: the permutation is already drawn) gives
process r the examples r, r+K, r+2K, ... of each global batch, and DDP averages the gradients — so K processes
take the same steps as one process with the same global batch (up to the order of floating-point sums; BatchNorm
statistics are those of each process's share, as in any DDP run without SyncBatchNorm). Augmentation is drawn for
the whole global batch and applied to each share. Only rank 0 writes files.

Outputs beside ``out`` (``F.safetensors``): ``F.log.csv`` (epoch, loss, train accuracy, validation accuracy, lr,
seconds) and ``F.state.safetensors`` (the last epoch's weights and optimiser state, for resuming: rerunning the
same command continues after the last finished epoch).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HetfuseError
from ..models import has_batchnorm
from .memory_format import use_channels_last

SCHEDULES = ("cosine", "step", "onecycle", "constant", "warmup-linear")


@dataclass
class FitSettings:
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    augment: bool = False
    seed: int = 0
    val_fraction: float = 0.1
    split_seed: int = 0
    temperature: float | None = None  # distillation
    alpha: float | None = None
    channels_last: bool = False
    warmup_epochs: float | None = None  # warmup-linear: epochs of linear warm-up (default 5% of the run)
    drop_last: bool = True              # drop the last incomplete batch of every epoch (needed with DDP)
    max_steps: int | None = None        # stop after this many optimiser steps in all (the schedule spans the run)

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise HetfuseError(f"epochs and batch size must be at least 1, got {self.epochs}, {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 0:
            raise HetfuseError(f"max_steps must be non-negative, got {self.max_steps}")
        if self.schedule not in SCHEDULES:
            raise HetfuseError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if not 0 <= self.val_fraction < 1:
            raise HetfuseError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if (self.temperature is None) != (self.alpha is None):
            raise HetfuseError("distillation needs both a temperature and alpha")
        if self.temperature is not None and not (self.temperature > 0 and 0 <= self.alpha <= 1):
            raise HetfuseError(f"temperature must be > 0 and alpha in [0, 1], got {self.temperature}, {self.alpha}")


def lr_at(step: int, total: int, base: float, schedule: str, warmup_steps: int = 1) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: cosine annealing to 0, step decay (x0.1 at 50% and
    75%), one-cycle (linear rise to ``base`` over the first 30%, cosine decay to ``base``/1e4), warmup-linear (linear
    rise to ``base`` over ``warmup_steps``, then linear decay to 0; ZipIt!'s recipe) or constant. The one schedule
    list of hetfuse's training loop: closed forms, so a resumed run continues the same schedule."""
    if schedule == "warmup-linear":
        if step < warmup_steps:
            return base * (step + 1) / warmup_steps
        return base * max(0.0, (total - step) / max(1, total - warmup_steps))
    f = step / max(1, total)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * f))
    if schedule == "step":
        return base * (0.1 ** (int(f >= 0.5) + int(f >= 0.75)))
    if schedule == "onecycle":
        if f < 0.3:
            return base / 25 + (base - base / 25) * f / 0.3
        g = (f - 0.3) / 0.7
        return base / 1e4 + (base - base / 1e4) * 0.5 * (1 + math.cos(math.pi * g))
    return base


def split_train_val(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices): the last ``fraction`` of a seeded permutation is held out (none when
    ``fraction`` is 0)."""
    if fraction == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    k = max(1, int(round(n * fraction)))
    return perm[:-k].sort().values, perm[-k:].sort().values


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process: from torchrun's environment, initialising the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
                      alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton et al.: α·T²·KL(softened teacher ‖ softened student) + (1 − α)·cross-entropy."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, y, label_smoothing=label_smoothing)


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict]
    best_epoch: int
    best_val: float
    resumed_from: int = 0
    settings: dict = field(default_factory=dict)


def state_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".state.safetensors")


def log_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".log.csv")


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits_of) -> float:
    from .trainer import predict_logits

    return 100.0 * float((logits_of(predict_logits(model, x)).argmax(1) == y).float().mean())


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: FitSettings, *, out: str | Path | None = None,
        teacher: nn.Module | None = None, head=None, progress: bool = True, resume: bool = True,
        metadata: dict | None = None, save=None, evaluate=None, desc: str | None = None,
        state_shard_bytes: int | None = None) -> FitResult:
    """Train ``model`` on ``(x, y)`` (see the module docstring); returns it with the weights of its best epoch.
    ``teacher``: distil from it (``settings.temperature``, ``settings.alpha``; both networks' outputs are
    logits over the same classes). ``head``: an :class:`~hetfuse.train.heads.OutputHead` whose training logits
    and targets the loss and the accuracies use (default: the outputs are the class logits).
    ``save(model, path, metadata)`` writes a checkpoint (default :func:`hetfuse.io.save_model`).
    ``evaluate(model)``: a dict of numbers added to each epoch's log line (e.g. test accuracy, for the record
    only: it never chooses the epoch kept). With ``settings.val_fraction == 0`` nothing is held out and the last
    epoch is kept. ``state_shard_bytes``: split the resume state into files of at most about that many bytes
    (``F.state.safetensors`` and its ``F.state.eEPOCH.partK.safetensors``; e.g. to keep each file under a
    repository's size limit); default one file."""
    from tqdm.auto import tqdm

    from ..data.augment import apply_crop_flip, crop_flip_params

    settings.check()
    if teacher is not None and head is not None and head.kind != "linear":
        raise HetfuseError("distillation matches class logits: the student needs a linear head")
    if head is not None:
        y = head.train_targets(y)
    logits_of = head.train_logits if head is not None else (lambda out: out)
    if save is None:
        from ..io import save_model

        def save(m, path, meta):
            save_model(m, path, metadata=meta, force=True)
    rank, world = distributed()
    if settings.batch_size % world:
        raise HetfuseError(f"the global batch size {settings.batch_size} must split evenly over {world} processes")
    out = Path(out) if out is not None else None
    dev = next(model.parameters()).device
    tr, va = split_train_val(x.shape[0], settings.val_fraction, settings.split_seed)
    x_val, y_val = x[va], y[va]
    n = tr.numel()
    if settings.drop_last:
        steps_per_epoch = n // settings.batch_size  # the last incomplete batch is dropped, whatever the processes
    else:
        if world > 1:
            raise HetfuseError("drop_last=False is for one process only: with DDP every batch must split evenly")
        steps_per_epoch = math.ceil(n / settings.batch_size)
        if has_batchnorm(model) and steps_per_epoch > 1 and n % settings.batch_size == 1:
            steps_per_epoch -= 1  # a batch of one example breaks batch norm in train mode
    if steps_per_epoch < 1:
        raise HetfuseError(f"{n} training examples are fewer than one batch of {settings.batch_size}")
    total = settings.epochs * steps_per_epoch
    warmup = max(1, min(total, int(round((0.05 * settings.epochs if settings.warmup_epochs is None
                                          else settings.warmup_epochs) * steps_per_epoch))))
    budget = total if settings.max_steps is None else min(total, settings.max_steps)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                          nesterov=settings.nesterov and settings.momentum > 0, weight_decay=settings.weight_decay)
    history: list[dict] = []
    best_val, best_epoch, best_state, start = -1.0, 0, None, 1
    state_file = state_path(out) if out is not None else None
    if resume and state_file is not None and state_file.is_file() and rank == 0:
        start, best_val, best_epoch, history, best_state = _load_state(state_file, model, opt, asdict(settings))
        start += 1
    if world > 1:  # every process continues from rank 0's state (the others may not see its files)
        start, best_val, best_epoch, history, best_state = _broadcast_state(
            model, opt, (start, best_val, best_epoch, history, best_state))
    if not va.numel():
        best_state = None  # nothing held out: the last epoch is kept (a state may hold an older "best" copy)
    channels_last = use_channels_last(settings.channels_last, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if teacher is not None:
        teacher = teacher.to(dev).eval()
    resumed_from = start - 1
    bar = tqdm(total=max(0, min(budget, settings.epochs * steps_per_epoch) - (start - 1) * steps_per_epoch),
               desc=desc or ("finetune" if teacher is None else "distill"), disable=not progress or rank != 0,
               leave=False, mininterval=0.1 if sys.stderr.isatty() else 30.0)  # a log file: a line per 30 s
    steps = (start - 1) * steps_per_epoch
    try:
        for epoch in range(start, settings.epochs + 1):
            if steps >= budget:
                break
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
            order = tr[torch.randperm(n, generator=g)]
            aug_g = torch.Generator().manual_seed(settings.seed * 100_003 + epoch + 7_919)
            net.train()
            tot_loss, correct, seen, done = 0.0, 0, 0, 0
            for step in range(steps_per_epoch):
                if steps >= budget:
                    break
                batch = order[step * settings.batch_size:(step + 1) * settings.batch_size]
                params = crop_flip_params(batch.numel(), generator=aug_g) if settings.augment else None
                if world > 1:
                    from torch.utils.data import DistributedSampler

                    mine = torch.tensor(list(DistributedSampler(range(batch.numel()), num_replicas=world, rank=rank,
                                                                shuffle=False)))
                else:
                    mine = torch.arange(batch.numel())
                xb, yb = x[batch[mine]], y[batch[mine]]
                if params is not None:
                    xb = apply_crop_flip(xb, tuple(p[mine] for p in params))
                xb, yb = xb.to(dev), yb.to(dev)
                if channels_last and xb.dim() == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                lr = lr_at((epoch - 1) * steps_per_epoch + step, total, settings.lr, settings.schedule, warmup)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                logits = logits_of(net(xb))
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(xb)
                    loss = distillation_loss(logits, t_logits, yb, settings.temperature, settings.alpha,
                                             settings.label_smoothing)
                else:
                    loss = F.cross_entropy(logits, yb, label_smoothing=settings.label_smoothing)
                loss.backward()
                opt.step()
                tot_loss += float(loss.detach()) * yb.numel()
                correct += int((logits.detach().argmax(1) == yb).sum())
                seen += yb.numel()
                steps += 1
                done += 1
                bar.update(1)
            if world > 1:  # the log counts every process's share of the epoch
                import torch.distributed as dist

                totals = torch.tensor([tot_loss, float(correct), float(seen)], dtype=torch.float64)
                dist.all_reduce(totals)
                tot_loss, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
            seconds = time.perf_counter() - t0
            val = _accuracy(model, x_val, y_val, logits_of) if va.numel() else float(epoch)  # none held out: last
            rec = {"epoch": epoch, "loss": tot_loss / max(1, seen), "train_acc": 100.0 * correct / max(1, seen),
                   "val_acc": val if va.numel() else float("nan"), "lr": lr, "seconds": seconds, "processes": world,
                   "batches": done}
            if evaluate is not None:
                rec.update({k: float(v) for k, v in evaluate(model).items()})
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", val=f"{val:.2f}")
            if val > best_val:
                best_val, best_epoch = val, epoch
                if va.numel():  # none held out: the last epoch is kept, no copy needed
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if rank == 0 and out is not None:
                meta = dict(metadata or {}, fit=asdict(settings), best_epoch=best_epoch, best_val=best_val,
                            history=history)
                if best_epoch == epoch:
                    save(_contiguous(model), out, dict(meta, best_val=best_val if va.numel() else None))
                write_log(log_path(out), history)
                _save_state(state_file, model, opt, epoch, best_val, best_epoch, history, best_state, asdict(settings),
                            shard_bytes=state_shard_bytes)
    finally:
        bar.close()
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(model.eval(), history, best_epoch, best_val, resumed_from, asdict(settings))


def _broadcast_state(model: nn.Module, opt, state: tuple) -> tuple:
    """Rank 0's resume state (epoch, bests, history, best weights, weights and momentum) on every process."""
    import torch.distributed as dist

    start, best_val, best_epoch, history, best_state = state
    momentum = [[opt.state.get(p, {}).get("momentum_buffer") for p in g["params"]] for g in opt.param_groups]
    box = [(start, best_val, best_epoch, history,
            None if best_state is None else {k: v.cpu() for k, v in best_state.items()},
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
            [[None if b is None else b.cpu() for b in row] for row in momentum])]
    dist.broadcast_object_list(box, src=0)
    start, best_val, best_epoch, history, best_state, weights, momentum = box[0]
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].device) for k, v in weights.items()})
    for g, row in zip(opt.param_groups, momentum, strict=False):
        for p, b in zip(g["params"], row, strict=False):
            if b is not None:
                opt.state[p]["momentum_buffer"] = b.to(p.device, p.dtype)
    return start, best_val, best_epoch, history, best_state


def _contiguous(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    return m.to(memory_format=torch.contiguous_format)


def write_log(path: Path, history: list[dict], digits: int | None = None) -> None:
    """The per-epoch log (CSV, written atomically); every column any epoch has (a run resumed from an older
    version's state adds columns its earlier epochs lack: left empty there); ``digits``: floats rounded to that
    many decimals."""
    from ..io.checkpoint import atomic_write_bytes

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for h in history for k in h)), restval="")
            w.writeheader()
            for h in history:
                w.writerow({k: (f"{v:.{digits}f}" if digits is not None and isinstance(v, float) else v)
                            for k, v in h.items()})

    atomic_write_bytes(path, write)


def _state_parts(path: Path) -> list[Path]:
    """The part files of a sharded state written at ``path`` (any epoch's)."""
    stem = path.name.removesuffix(".safetensors")
    return sorted(path.parent.glob(f"{stem}.e*.part*.safetensors"))


def remove_state(path: Path) -> None:
    """Delete the resume state at ``path`` with any part files of a sharded one."""
    for f in [path, *_state_parts(path)]:
        f.unlink(missing_ok=True)


def _shards(tensors: dict[str, torch.Tensor], limit: int | None) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in groups of at most ``limit`` bytes each, in order (a tensor larger than that alone)."""
    if limit is None:
        return [tensors]
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if groups[-1] and size + n > limit:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += n
    return groups


def _save_state(path: Path, model: nn.Module, opt, epoch, best_val, best_epoch, history, best_state,
                settings: dict, shard_bytes: int | None = None) -> None:
    """Write the resume state to ``path``; with ``shard_bytes``, tensors beyond the first that many bytes go to
    part files named after the epoch, written before ``path`` names them (an interruption leaves the previous
    epoch's state whole); the parts of earlier epochs are removed afterwards."""
    from safetensors.torch import save_file

    from ..io.checkpoint import atomic_write_bytes

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"opt.{i}.{j}"] = buf.detach().cpu().contiguous()
    meta = {"epoch": str(epoch), "best_val": str(best_val), "best_epoch": str(best_epoch),
            "history": json.dumps(history), "settings": json.dumps(settings, sort_keys=True)}
    first, *rest = _shards(tensors, shard_bytes)
    stem = path.name.removesuffix(".safetensors")
    names = [f"{stem}.e{epoch}.part{k}.safetensors" for k in range(1, len(rest) + 1)]
    for name, part in zip(names, rest, strict=True):
        atomic_write_bytes(path.parent / name, lambda tmp, part=part: save_file(part, tmp))
    if names:
        meta["parts"] = json.dumps(names)
    atomic_write_bytes(path, lambda tmp: save_file(first, tmp, metadata=meta))
    for old in _state_parts(path):
        if old.name not in names:
            old.unlink(missing_ok=True)


# settings that change how the run executes, not what it computes: a run resumes across a change of them
EXECUTION_ONLY = frozenset({"channels_last"})


def _load_state(path: Path, model: nn.Module, opt, settings: dict):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    for name in json.loads(meta.get("parts", "[]")):  # a sharded state (fit's state_shard_bytes)
        part = path.parent / name
        if not part.is_file():
            raise HetfuseError(f"{path} is a state in several files and {part} is missing: restore it, or start "
                               "over (remove the state, or --restart)")
        with safe_open(str(part), framework="pt", device="cpu") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    saved = json.loads(meta.get("settings", "{}"))
    defaults = asdict(FitSettings())  # a setting added since the state was written counts as its default
    changed = sorted(k for k in set(saved) | set(settings)
                     if k not in EXECUTION_ONLY and saved.get(k, defaults.get(k)) != settings.get(k))
    if changed:
        diff = ", ".join(f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise HetfuseError(f"{path} holds a run with other settings ({diff}): rerun with the same "
                           "settings to resume it, or start over (remove it, or --restart)")
    ref = model.state_dict()
    mine = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(mine) != set(ref) or any(tuple(mine[k].shape) != tuple(ref[k].shape) for k in ref):
        raise HetfuseError(f"{path} was written for another model: remove it or use another --out")
    model.load_state_dict({k: v.to(ref[k].device, ref[k].dtype) for k, v in mine.items()})
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")} or None
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            if f"opt.{i}.{j}" in tensors:
                opt.state[p]["momentum_buffer"] = tensors[f"opt.{i}.{j}"].to(p.device, p.dtype)
    return (int(meta["epoch"]), float(meta["best_val"]), int(meta["best_epoch"]), json.loads(meta["history"]), best)
