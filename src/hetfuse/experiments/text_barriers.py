"""Loss barriers between finetuned text encoders (the heterogeneous-merging paper's Table IV, §IV-C and supplement
S3-A, at CPU scale).

The paper: five MultiBERTs (12 layers, seeds 1-5), a 17-layer copy of each made by repeating even-numbered layers
before finetuning, every model finetuned per GLUE task with a classification head whose initialisation is the same
across models; then the loss barrier and the error barrier (Frankle et al.) along the linear path between two models
finetuned from different pretraining seeds, for vanilla averaging (no alignment), homogeneous merging (two 12-layer
models, aligned) and heterogeneous merging (a 12-layer and a 17-layer model, depth-aligned by LMA, then aligned).

Here (``hetfuse experiment text-barriers``):

* **data** (:mod:`hetfuse.data.text`): WordNet 3.0 glosses and BBC News instead of GLUE (nothing else is reachable
  offline): five tasks (noun supersense 26-way, verb supersense 15-way, part of speech of a gloss 4-way, lemma/
  definition match 2-way, BBC topic 5-way); a WordPiece vocabulary trained here on the pretraining corpus (the
  training synsets and articles), cached;
* **models**: the zoo's pre-LN ``bert`` encoder (:class:`~hetfuse.models.BertEncoder`; full scale: d = 128, 4 heads,
  FFN 512, 4 layers, 32 tokens), pretrained by masked-language modelling with three seeds (cached, resumable after
  every epoch); the deeper variant repeats the even-numbered layers (1-based layers 2 and 4: the 4-layer
  [L1, L2, L3, L4] becomes the 6-layer [L1, L2, L2, L3, L4, L4], each copy right after its original;
  :func:`repeat_layers`) before finetuning, as the paper extends 12 layers to 17; every model (each seed, both
  depths) is finetuned per task from a classification head drawn once per task with a fixed seed (the same for
  every model) and the same order of batches, so two models of a task differ by their pretraining seed (and depth);
* **rows**, for every pair of seeds (i < j) and every task: *vanilla averaging* (the 4-layer models of seeds i and
  j, ``align="none"``), *homogeneous merging* (the same pair, heads and streams matched by ``perm-acts``: the
  permutation matching of the engine, whole attention heads as units), *heterogeneous merging* (the 4-layer model
  of seed i and the 6-layer model of seed j, depth-aligned by LMA — the paper's row — and by SMA and CLA, zero
  blocks added to the 4-layer model, then ``perm-acts``), each through :func:`hetfuse.barrier` (``points`` values of
  t, the task's test examples; alignment samples from its training inputs): the loss barrier and the error barrier
  of Frankle et al. (max over t of the value minus the straight line between the endpoints), and the paper's eq. (3)
  variant beside them (minus the endpoints' mean).

Scales (``scale=`` or ``$HETFUSE_TEXT_SCALE``; :data:`SCALES`): ``full`` (the table), ``tiny`` (a check of the
whole pipeline on real data in a few minutes) and ``smoke`` (the CI test: tiny models, made-up data in the real file
formats when the sources point there).

Cost of the full scale, measured on this 2-core machine with one thread (``OMP_NUM_THREADS=1 nice -n 10``) while two
other trainings and two experiments kept the load average at 4.5-6: a pretraining step (batch 64 x 32 tokens,
masked-LM head over 8192 tokens) 0.18-0.24 s; a finetuning step (batch 32) 0.080-0.085 s with 4 layers, 0.116-0.121 s
with 6; one path of 21 points on 1000 test examples (400 alignment samples) 30 s for vanilla averaging, 39 s for
homogeneous merging, 44 s for heterogeneous merging (LMA). The full scale has 110,946 pretraining sequences (1733
steps per epoch): 3 seeds x 3 epochs = 15,597 steps, 48-62 min; 30 finetunes (5 tasks x 3 seeds x 2 depths, 3
epochs, 24,578 training examples = 771 steps per epoch and model over the tasks): ~24 min; 75 paths (15 per task;
BBC's test split holds 418 examples, the others 938-1000): ~45 min; data and tokenizer < 1 min: **about 2 h (1 h 55
min to 2 h 15 min)** on the loaded machine, less on an idle one, inside the issue's 3 h. The ``tiny`` scale took 4.1
min end to end under the same load. Pretrained and finetuned models are cached (``$HETFUSE_CACHE/models``),
pretraining resumes after its last finished epoch, and ``--resume`` keeps the paths already in ``results.csv``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import cache_dir, cache_key
from ..data import text as textdata
from ..errors import HetfuseError
from ..models import BertEncoder
from .common import ResumableRows, cached_model, fmt_ms, mean_std, prepare_output, write_command, write_csv

SCALE_ENV = "HETFUSE_TEXT_SCALE"

# The even-numbered layers of the 4-layer encoder, 0-based (1-based layers 2 and 4): each is repeated right after
# itself, 4 -> 6 layers.
DEFAULT_REPEAT = (1, 3)


@dataclass(frozen=True)
class TextScale:
    """Every size of one run (see :data:`SCALES`)."""

    name: str
    vocab: int = 8192            # WordPiece vocabulary to train (the model takes the size the tokenizer reached)
    seq: int = 32                # tokens per example, [CLS] first
    dim: int = 128
    heads: int = 4
    mlp: int = 512
    depth: int = 4
    repeat: tuple[int, ...] = DEFAULT_REPEAT
    pretrain_epochs: int = 3
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_sequences: int | None = None   # at most this many pretraining sequences (a seeded draw); None: all
    finetune_epochs: int = 3
    finetune_batch: int = 32
    finetune_lr: float = 5e-4
    n_train: int = 6000          # per task, at most
    n_test: int = 1000
    points: int = 21             # values of t on each path (the paper: 21)
    samples: int = 400           # alignment samples
    tasks: tuple[str, ...] = textdata.TEXT_TASKS
    seeds: tuple[int, ...] = (0, 1, 2)


SCALES = {
    "full": TextScale("full"),
    "tiny": TextScale("tiny", vocab=2000, dim=64, heads=4, mlp=256, pretrain_epochs=1, pretrain_sequences=3000,
                      finetune_epochs=2, n_train=400, n_test=200, points=11, samples=200),
    "smoke": TextScale("smoke", vocab=300, seq=16, dim=16, heads=2, mlp=32, pretrain_epochs=1, pretrain_batch=16,
                       pretrain_lr=3e-3, pretrain_sequences=256, finetune_epochs=1, finetune_batch=16,
                       finetune_lr=3e-3, n_train=48, n_test=24, points=3, samples=24, seeds=(0, 1)),
}

MASK_PROB = 0.15
WEIGHT_DECAY = 0.01
PRETRAIN_WARMUP = 0.06       # fraction of the steps
FINETUNE_WARMUP = 0.1
HEAD_SEED = 1000             # the classification head of task k is drawn with seed HEAD_SEED + k, for every model

# The paper's Table IV (GLUE, BERT 12 vs 17 layers): task -> row -> (loss barrier, error barrier). Copied from the
# paper's text; the extracted text lost some decimal points ("131", "281", "007", "187", "012"), restored here as
# 1.31, 2.81, 0.07, 1.87, 0.12 from the columns' other values.
PAPER_TABLE4 = {
    "MNLI-mm": {"vanilla": (0.59, 0.06), "homo": (0.65, 0.09), "hetero": (0.67, 0.07)},
    "QQP": {"vanilla": (1.38, 0.07), "homo": (1.11, 0.08), "hetero": (1.16, 0.08)},
    "QNLI": {"vanilla": (0.67, 0.04), "homo": (0.76, 0.05), "hetero": (0.71, 0.06)},
    "SST-2": {"vanilla": (0.52, 0.02), "homo": (0.38, 0.08), "hetero": (0.42, 0.10)},
    "CoLA": {"vanilla": (1.31, 0.16), "homo": (1.11, 0.11), "hetero": (1.05, 0.14)},
    "STS-B": {"vanilla": (5.04, 0.39), "homo": (4.32, 0.32), "hetero": (4.24, 0.28)},
    "MRPC": {"vanilla": (2.81, 0.07), "homo": (1.87, 0.12), "hetero": (1.88, 0.12)},
    "RTE": {"vanilla": (0.54, 0.03), "homo": (0.44, 0.03), "hetero": (0.46, 0.06)},
}


@dataclass(frozen=True)
class Row:
    label: str
    kind: str            # vanilla | homo | hetero (the paper's three columns)
    depth_align: str
    match: str


ROWS = [Row("Vanilla averaging", "vanilla", "", "none"), Row("Homo merging (perm)", "homo", "", "perm-acts"),
        Row("Hetero merging (LMA + perm)", "hetero", "lma", "perm-acts"),
        Row("Hetero merging (SMA + perm)", "hetero", "sma", "perm-acts"),
        Row("Hetero merging (CLA + perm)", "hetero", "cla", "perm-acts")]
PAPER_ROW = {"vanilla": "Vanilla averaging", "homo": "Homo merging (perm)", "hetero": "Hetero merging (LMA + perm)"}

COLUMNS = ["task", "method", "kind", "depth_align", "match", "pair", "seed_a", "seed_b", "depth_a", "depth_b",
           "loss_barrier", "error_barrier", "t_loss", "t_error", "loss_barrier_eq3", "error_barrier_eq3",
           "loss_a", "loss_b", "error_a", "error_b", "mid_loss", "mid_error", "mapping", "examples", "seconds"]


def get_scale(scale: str | TextScale | None = None) -> TextScale:
    """A scale by name (``None``: ``$HETFUSE_TEXT_SCALE``, else ``full``)."""
    if isinstance(scale, TextScale):
        return scale
    name = scale or os.environ.get(SCALE_ENV) or "full"
    if name not in SCALES:
        raise HetfuseError(f"unknown text-barriers scale {name!r}; known: {', '.join(SCALES)}")
    return SCALES[name]


# ------------------------------------------------------------------------------------------------ the models


def repeated_order(depth: int, positions: Sequence[int] = DEFAULT_REPEAT) -> list[int]:
    """The 0-based original layer of every layer of the deepened encoder: each layer in ``positions`` is followed by
    its copy, e.g. ``repeated_order(4, (1, 3)) == [0, 1, 1, 2, 3, 3]``."""
    pos = sorted(set(int(p) for p in positions))
    if any(not 0 <= p < depth for p in pos):
        raise HetfuseError(f"repeat positions {list(positions)} lie outside the {depth} layers (0-based)")
    order = []
    for i in range(depth):
        order += [i, i] if i in pos else [i]
    return order


def repeat_layers(model: BertEncoder, positions: Sequence[int] = DEFAULT_REPEAT) -> BertEncoder:
    """A deeper :class:`BertEncoder` whose layers are ``model``'s with the layers at ``positions`` (0-based) repeated:
    layer ``order[k]`` of ``model`` at position k, ``order = repeated_order(model.depth, positions)``. Every other
    parameter (embeddings, final norm, head) is copied; ``model`` is left unchanged. The deeper encoder computes
    something else (a repeated layer adds its residual branch twice)."""
    order = repeated_order(model.depth, positions)
    arch = dict(model.arch(), depth=len(order))
    deep = BertEncoder.from_arch(arch)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    deep.load_state_dict(own, strict=False)
    for k, src in enumerate(order):
        deep.blocks[k].load_state_dict(model.blocks[src].state_dict())
    return deep.train(model.training)


class MaskedLM(nn.Module):
    """The pretraining network: the encoder's embeddings, blocks and final norm, then BERT's prediction head (Linear,
    GELU, LayerNorm) and the output layer tied to the token embedding, evaluated at the masked positions only."""

    def __init__(self, encoder: BertEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.transform = nn.Linear(encoder.dim, encoder.dim)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(encoder.dim)
        self.bias = nn.Parameter(torch.zeros(encoder.vocab))

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.embed(tokens) + enc.pos_embed
        for block in enc.blocks:
            x = block(x)
        h = self.ln(self.act(self.transform(enc.norm(x)[masked])))
        return h @ enc.embed.weight.t() + self.bias


def mask_tokens(x: torch.Tensor, generator: torch.Generator, vocab: int,
                prob: float = MASK_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each non-special token is chosen with probability ``prob`` (at least one per batch); of the
    chosen, 80% become ``[MASK]``, 10% a random token, 10% stay. Returns ``(inputs, chosen)`` (a boolean mask)."""
    special = x < len(textdata.SPECIAL_TOKENS)
    r = torch.rand(x.shape, generator=generator)
    chosen = (r < prob) & ~special
    if not chosen.any():
        r = r.masked_fill(special, 2.0)
        chosen.view(-1)[int(r.view(-1).argmin())] = True
    how = torch.rand(x.shape, generator=generator)
    rand_tok = torch.randint(len(textdata.SPECIAL_TOKENS), vocab, x.shape, generator=generator)
    inputs = x.clone()
    inputs[chosen & (how < 0.8)] = textdata.MASK
    swap = chosen & (how >= 0.8) & (how < 0.9)
    inputs[swap] = rand_tok[swap]
    return inputs, chosen


def _tensor_digest(x: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16]


def _lr(step: int, total: int, base: float, warmup_fraction: float) -> float:
    from ..train import lr_at

    return lr_at(step, total, base, "warmup-linear", max(1, int(round(warmup_fraction * total))))


def _save_state(path: Path, mlm: MaskedLM, opt: torch.optim.Optimizer, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in mlm.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)


def _load_state(path: Path, mlm: MaskedLM, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    mlm.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    return meta


def pretrain(corpus: torch.Tensor, vocab: int, scale: TextScale, seed: int, *, cache=True,
             progress: bool = False) -> tuple[BertEncoder, dict]:
    """The ``scale.depth``-layer encoder pretrained by masked-language modelling on ``corpus`` (``N x seq`` token
    ids) with ``seed`` (initialisation, batch order, masking): AdamW (weight decay 0.01, betas 0.9/0.98), linear
    warm-up over 6% of the steps then linear decay, gradients clipped at norm 1. Cached; after every epoch the state
    (weights, optimiser, history) is written beside the cache entry, and a later call resumes after the last finished
    epoch."""
    s = scale
    spec = {"kind": "text-mlm", "corpus": _tensor_digest(corpus), "n": int(corpus.shape[0]), "seq": s.seq,
            "vocab": int(vocab), "dim": s.dim, "heads": s.heads, "mlp": s.mlp, "depth": s.depth, "seed": int(seed),
            "epochs": s.pretrain_epochs, "batch": s.pretrain_batch, "lr": s.pretrain_lr, "wd": WEIGHT_DECAY,
            "warmup": PRETRAIN_WARMUP, "mask": MASK_PROB}
    prefix = f"bert-mlm-d{s.depth}-w{s.dim}-s{seed}"
    folder = cache_dir("models") if cache is True else (Path(cache) if cache else None)
    state_file = folder / f"{cache_key(spec, prefix=prefix)}.state.safetensors" if folder is not None else None

    def fresh():
        torch.manual_seed(int(seed))
        enc = BertEncoder(depth=s.depth, dim=s.dim, heads=s.heads, vocab=int(vocab), seq=s.seq, mlp=s.mlp,
                          num_classes=2)
        nn.init.normal_(enc.embed.weight, std=0.02)  # BERT's; PyTorch's N(0, 1) with a tied output layer diverges
        mlm = MaskedLM(enc)
        return mlm, torch.optim.AdamW(mlm.parameters(), lr=s.pretrain_lr, betas=(0.9, 0.98), eps=1e-6,
                                      weight_decay=WEIGHT_DECAY)

    def train():
        mlm, opt = fresh()
        n = corpus.shape[0]
        per_epoch = max(1, n // s.pretrain_batch)
        total = s.pretrain_epochs * per_epoch
        history: list[dict] = []
        start = 1
        if state_file is not None and state_file.is_file():
            try:
                meta = _load_state(state_file, mlm, opt)
                if meta.get("spec") == spec:
                    history, start = meta["history"], int(meta["epoch"]) + 1
                else:
                    raise ValueError("another run's state")
            except Exception:  # noqa: BLE001  (a corrupt or foreign state: start again)
                mlm, opt = fresh()
                history, start = [], 1
        from tqdm.auto import tqdm

        for epoch in range(start, s.pretrain_epochs + 1):
            g = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
            order = torch.randperm(n, generator=g)
            mlm.train()
            t0, tot, count = time.perf_counter(), 0.0, 0
            for step in tqdm(range(per_epoch), desc=f"pretrain seed {seed} epoch {epoch}/{s.pretrain_epochs}",
                             disable=not progress, leave=False):
                xb = corpus[order[step * s.pretrain_batch:(step + 1) * s.pretrain_batch]]
                inputs, chosen = mask_tokens(xb, g, int(vocab))
                for group in opt.param_groups:
                    group["lr"] = _lr((epoch - 1) * per_epoch + step, total, s.pretrain_lr, PRETRAIN_WARMUP)
                loss = F.cross_entropy(mlm(inputs, chosen), xb[chosen])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(mlm.parameters(), 1.0)
                opt.step()
                tot += float(loss.detach())
                count += 1
            seconds = time.perf_counter() - t0
            history.append({"epoch": epoch, "mlm_loss": tot / max(1, count), "steps": count, "seconds": seconds,
                            "seconds_per_step": seconds / max(1, count)})
            if state_file is not None:
                state_file.parent.mkdir(parents=True, exist_ok=True)
                _save_state(state_file, mlm, opt, {"spec": spec, "epoch": epoch, "history": history})
        return mlm.encoder.eval(), {"history": history, "arch": mlm.encoder.arch(), "seed": int(seed)}

    model, meta = cached_model(spec, train, prefix=prefix, cache=cache)
    if state_file is not None and state_file.is_file():
        state_file.unlink()  # the finished model is cached; its resume state is no longer needed
    return model, meta


def _classifier(pretrained: BertEncoder, num_classes: int, head_seed: int, repeat: Sequence[int] | None):
    """A copy of the pretrained trunk (deepened by :func:`repeat_layers` when ``repeat`` is given) with a new
    classification head drawn with ``head_seed`` (the same head for every model of a task)."""
    base = repeat_layers(pretrained, repeat) if repeat else copy.deepcopy(pretrained)
    model = BertEncoder.from_arch(dict(base.arch(), num_classes=int(num_classes)))
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("head.")}, strict=False)
    g = torch.Generator().manual_seed(int(head_seed))
    bound = 1.0 / math.sqrt(model.dim)   # nn.Linear's default initialisation, from a seeded generator
    with torch.no_grad():
        model.head.weight.copy_(torch.empty_like(model.head.weight).uniform_(-bound, bound, generator=g))
        model.head.bias.copy_(torch.empty_like(model.head.bias).uniform_(-bound, bound, generator=g))
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent) on ``(x, y)``."""
    from ..train import predict_logits

    out = predict_logits(model, x, batch_size).double()
    return float(F.cross_entropy(out, y)), 100.0 * float((out.argmax(1) == y).double().mean())


def finetune(pretrained: BertEncoder, pretrain_meta: dict, data: tuple, task: str, task_index: int,
             num_classes: int, scale: TextScale, *, deep: bool, cache=True,
             progress: bool = False) -> tuple[BertEncoder, dict]:
    """The pretrained encoder (``deep``: with its even-numbered layers repeated, :func:`repeat_layers`) finetuned on
    ``data = (x_train, y_train, x_test, y_test)`` with AdamW (weight decay 0.01, linear warm-up over 10% of the
    steps, linear decay), batches in an order seeded by the task (the same for every model); cached."""
    s = scale
    x, y, x_test, y_test = data
    head_seed = HEAD_SEED + task_index
    spec = {"kind": "text-finetune", "pretrained": pretrain_meta.get("cache_spec"), "task": task,
            "data": _tensor_digest(torch.cat([x.flatten(), y, x_test.flatten(), y_test])), "classes": int(num_classes),
            "repeat": list(s.repeat) if deep else [], "epochs": s.finetune_epochs, "batch": s.finetune_batch,
            "lr": s.finetune_lr, "wd": WEIGHT_DECAY, "warmup": FINETUNE_WARMUP, "head_seed": head_seed}
    seed = int(pretrain_meta.get("seed", 0))
    depth = s.depth + (len(set(s.repeat)) if deep else 0)

    def train():
        from tqdm.auto import tqdm

        model = _classifier(pretrained, num_classes, head_seed, s.repeat if deep else None)
        opt = torch.optim.AdamW(model.parameters(), lr=s.finetune_lr, weight_decay=WEIGHT_DECAY)
        n = x.shape[0]
        per_epoch = max(1, math.ceil(n / s.finetune_batch))
        total = s.finetune_epochs * per_epoch
        history = []
        for epoch in range(1, s.finetune_epochs + 1):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(head_seed * 100_003 + epoch))
            model.train()
            t0, tot, correct = time.perf_counter(), 0.0, 0
            for step in tqdm(range(per_epoch), desc=f"finetune {task} seed {seed} depth {depth} epoch {epoch}",
                             disable=not progress, leave=False):
                idx = order[step * s.finetune_batch:(step + 1) * s.finetune_batch]
                for group in opt.param_groups:
                    group["lr"] = _lr((epoch - 1) * per_epoch + step, total, s.finetune_lr, FINETUNE_WARMUP)
                out = model(x[idx])
                loss = F.cross_entropy(out, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                tot += float(loss.detach()) * idx.numel()
                correct += int((out.detach().argmax(1) == y[idx]).sum())
            seconds = time.perf_counter() - t0
            history.append({"epoch": epoch, "loss": tot / n, "train_acc": 100.0 * correct / n, "steps": per_epoch,
                            "seconds": seconds, "seconds_per_step": seconds / per_epoch})
        model.eval()
        test_loss, test_acc = evaluate(model, x_test, y_test)
        return model, {"history": history, "task": task, "seed": seed, "depth": depth, "test_loss": test_loss,
                       "test_acc": test_acc, "head_seed": head_seed, "repeat": list(s.repeat) if deep else []}

    return cached_model(spec, train, prefix=f"bert-{task}-d{depth}-s{seed}", cache=cache)


# ------------------------------------------------------------------------------------------------ the run


def _pairs(seeds: Sequence[int]) -> list[tuple[int, int]]:
    return [(a, b) for i, a in enumerate(seeds) for b in seeds[i + 1:]]


def _subset(x: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    if n is None or n >= x.shape[0]:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx]


def run_text_barriers(*, out_dir, scale: str | TextScale | None = None, seeds: Sequence[int] | None = None,
                      samples: int | None = None, epochs: int | None = None, tasks: Sequence[str] | None = None,
                      wordnet=None, bbc=None, split_seed: int = 0, cache=True, progress: bool = True,
                      force: bool = False, resume: bool = False, command: str | None = None) -> list[dict]:
    """Run the experiment (see the module docstring) into ``out_dir``: ``results.csv`` (one line per task, row and
    pair of seeds), ``curves.json`` (loss and error at every t of every path), ``models.csv`` (every finetuned model's
    test loss and accuracy), ``pretraining.csv`` (masked-LM loss per seed and epoch), ``timings.json`` (measured
    seconds per step and per stage), ``barriers.png``, ``summary.md`` (the paper's Table IV beside ours) and
    ``command.txt``. ``scale``: a :data:`SCALES` name or a :class:`TextScale`; ``seeds``, ``samples``, ``epochs``
    (finetuning), ``tasks`` override it. ``wordnet``, ``bbc``: the sources' folders (default: the installed
    packages). Returns the rows."""
    from tqdm.auto import tqdm

    from ..barriers import barrier

    s = get_scale(scale)
    s = replace(s, seeds=tuple(seeds) if seeds is not None else s.seeds,
                samples=int(samples) if samples is not None else s.samples,
                finetune_epochs=int(epochs) if epochs is not None else s.finetune_epochs,
                tasks=tuple(tasks) if tasks is not None else s.tasks)
    if len(s.seeds) < 2:
        raise HetfuseError("text-barriers needs at least two pretraining seeds (the paths join different seeds)")
    if s.finetune_epochs < 1:
        raise HetfuseError(f"finetuning epochs must be at least 1, got {s.finetune_epochs}")
    out = Path(out_dir)
    if resume and (out / "results.csv").is_file():
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = prepare_output(out_dir, force)
    timings: dict = {"scale": asdict(s)}
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[text-barriers] {msg}", flush=True)

    t0 = time.perf_counter()
    need = [k for k, used in (("wordnet", any(t != "bbc-topic" for t in s.tasks)), ("bbc", "bbc-topic" in s.tasks))
            if used]
    sources = textdata.load_sources(wordnet=wordnet, bbc=bbc, split_seed=split_seed, need=need)
    task_data = textdata.load_text_tasks(s.tasks, n_train=s.n_train, n_test=s.n_test, sources=sources)
    docs = textdata.pretraining_corpus(sources)
    tokenizer = textdata.train_wordpiece(docs, s.vocab, cache=cache)
    vocab = int(tokenizer.get_vocab_size())
    corpus = _subset(textdata.encode_corpus(tokenizer, docs, s.seq), s.pretrain_sequences, split_seed)
    encoded = {name: textdata.encode_task(tokenizer, t, s.seq) for name, t in task_data.items()}
    timings["data_seconds"] = time.perf_counter() - t0
    log(f"data: {len(sources.synsets)} synsets, {len(sources.articles)} articles, {corpus.shape[0]} pretraining "
        f"sequences of {s.seq} tokens, vocabulary {vocab}, tasks " +
        ", ".join(f"{n} ({len(t.y_train)}/{len(t.y_test)})" for n, t in task_data.items()))

    t0 = time.perf_counter()
    pretrained = {}
    pre_rows = []
    for seed in s.seeds:
        log(f"pretraining seed {seed} ({s.pretrain_epochs} epochs x {max(1, corpus.shape[0] // s.pretrain_batch)} "
            "steps; cached and resumable)")
        enc, meta = pretrain(corpus, vocab, s, seed, cache=cache, progress=progress)
        pretrained[seed] = (enc, meta)
        pre_rows += [dict(h, seed=seed) for h in meta.get("history", [])]
    write_csv(out / "pretraining.csv", pre_rows, ["seed", "epoch", "mlm_loss", "steps", "seconds", "seconds_per_step"])
    timings["pretrain_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models: dict[tuple[str, int, bool], BertEncoder] = {}
    model_rows = []
    for k, name in enumerate(textdata.TEXT_TASKS):
        if name not in task_data:
            continue
        for seed in s.seeds:
            for deep in (False, True):
                m, meta = finetune(*pretrained[seed], encoded[name], name, k, task_data[name].num_classes, s,
                                   deep=deep, cache=cache, progress=progress)
                models[(name, seed, deep)] = m
                hist = meta.get("history", [])
                steps = sum(h["steps"] for h in hist)
                model_rows.append({"task": name, "seed": seed, "depth": meta["depth"], "test_acc": meta["test_acc"],
                                   "test_loss": meta["test_loss"], "train_loss": hist[-1]["loss"] if hist else "",
                                   "steps": steps, "seconds_per_step": (sum(h["seconds"] for h in hist) / steps
                                                                        if steps else "")})
        log(f"finetuned {name}: " + ", ".join(f"s{r['seed']}/d{r['depth']} {r['test_acc']:.1f}%"
                                              for r in model_rows if r["task"] == name))
    write_csv(out / "models.csv", model_rows,
              ["task", "seed", "depth", "test_acc", "test_loss", "train_loss", "steps", "seconds_per_step"])
    timings["finetune_seconds"] = time.perf_counter() - t0

    rows = ResumableRows(out / "results.csv", COLUMNS, ["task", "method", "pair"], resume=resume)
    curves_path = out / "curves.json"
    curves = json.loads(curves_path.read_text()) if resume and curves_path.is_file() else {}
    jobs = [(name, row, a, b) for name in task_data for row in ROWS for a, b in _pairs(s.seeds)]
    t0 = time.perf_counter()
    for name, row, a, b in tqdm(jobs, desc="barriers", disable=not progress):
        pair = f"s{a}-s{b}"
        if rows.has(task=name, method=row.label, pair=pair):
            continue
        deep_b = row.kind == "hetero"
        ma, mb = models[(name, a, False)], models[(name, b, deep_b)]
        x_tr, _, x_te, y_te = encoded[name]
        opts = {"depth_align": row.depth_align} if row.depth_align else {}
        t1 = time.perf_counter()
        res = barrier(ma, mb, (x_te, y_te), points=s.points, align=row.match, align_data=x_tr, samples=s.samples,
                      seed=0, progress=False, **opts)
        seconds = time.perf_counter() - t1
        mapping = next((m["alignment"] for m in res.fusion.get("mappings", []) if m.get("changed")), None)
        mean_l, mean_e = (res.loss[0] + res.loss[-1]) / 2, (res.error[0] + res.error[-1]) / 2
        mid = len(res.ts) // 2
        rows.add({"task": name, "method": row.label, "kind": row.kind, "depth_align": row.depth_align,
                  "match": row.match, "pair": pair, "seed_a": a, "seed_b": b, "depth_a": ma.depth,
                  "depth_b": mb.depth, "loss_barrier": res.loss_barrier, "error_barrier": res.error_barrier,
                  "t_loss": res.t_loss, "t_error": res.t_error, "loss_barrier_eq3": max(res.loss) - mean_l,
                  "error_barrier_eq3": max(res.error) - mean_e, "loss_a": res.model_loss[0],
                  "loss_b": res.model_loss[1], "error_a": res.model_error[0], "error_b": res.model_error[1],
                  "mid_loss": res.loss[mid], "mid_error": res.error[mid],
                  "mapping": "" if mapping is None else "[" + ",".join(str(int(i) + 1) for i in mapping) + "]",
                  "examples": res.examples, "seconds": seconds})
        curves[f"{name}|{row.label}|{pair}"] = {"ts": res.ts, "loss": res.loss, "error": res.error,
                                                "model_loss": res.model_loss, "model_error": res.model_error}
        tmp = curves_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(curves))
        tmp.replace(curves_path)
    timings["barrier_seconds"] = time.perf_counter() - t0
    timings["barrier_seconds_per_path"] = _per_path(rows.rows)
    timings["total_seconds"] = time.perf_counter() - t_all
    timings["pretrain_seconds_per_step"] = _mean([r["seconds_per_step"] for r in pre_rows])
    for deep in (False, True):
        d = s.depth + (len(set(s.repeat)) if deep else 0)
        timings[f"finetune_seconds_per_step_depth{d}"] = _mean([r["seconds_per_step"] for r in model_rows
                                                               if r["depth"] == d])
    (out / "timings.json").write_text(json.dumps(timings, indent=1, default=str) + "\n")
    _plot(curves, out / "barriers.png", list(task_data))
    cmd = write_command(out, command)
    custom = [f"{what} from the folder `{Path(str(given or os.environ[env])).name}`" for what, given, env in
              (("WordNet", wordnet, textdata.WORDNET_ENV), ("BBC News", bbc, textdata.BBC_ENV))
              if (given or os.environ.get(env))]
    (out / "summary.md").write_text(_summary(s, rows.rows, model_rows, pre_rows, task_data, vocab, corpus, timings,
                                             cmd, custom))
    return rows.rows


def _mean(vals) -> float | str:
    vals = [float(v) for v in vals if v not in ("", None)]
    return sum(vals) / len(vals) if vals else ""


def _per_path(rows: list[dict]) -> dict:
    out = {}
    for kind in ("vanilla", "homo", "hetero"):
        out[kind] = _mean([r["seconds"] for r in rows if r["kind"] == kind])
    return out


def _plot(curves: dict, path: Path, tasks: list[str]) -> None:
    """One panel per task: the test loss along t of every row (the mean over the pairs of seeds)."""
    from ..report.figures import LEGEND_FONTSIZE, TITLE_FONTSIZE, _plt

    if not curves:
        return
    plt = _plt()
    n = len(tasks)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.3 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for row in ROWS:
            sel = [v for k, v in curves.items() if k.startswith(f"{task}|{row.label}|")]
            if not sel:
                continue
            ts = sel[0]["ts"]
            mean = [sum(c["loss"][i] for c in sel) / len(sel) for i in range(len(ts))]
            ax.plot(ts, mean, "o-", markersize=3, label=row.label)
        ax.set_title(task, fontsize=TITLE_FONTSIZE)
        ax.set_xlabel("t (0: 4-layer model of seed i, 1: model of seed j)")
        ax.set_ylabel("test loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", fontsize=LEGEND_FONTSIZE, ncol=min(3, len(names)), frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _vals(rows, task, label, key):
    return [float(r[key]) for r in rows if r["task"] == task and r["method"] == label
            and str(r[key]) not in ("", "nan")]


def _summary(s: TextScale, rows, model_rows, pre_rows, task_data, vocab, corpus, timings, cmd, custom=()) -> str:
    tasks = list(task_data)
    n_pairs = len(_pairs(s.seeds))
    deep = s.depth + len(set(s.repeat))
    order = repeated_order(s.depth, s.repeat)
    lines = [f"# Loss barriers between finetuned text encoders (the heterogeneous-merging paper's Table IV, "
             f"{s.name} scale)", "",
             f"Command: `{cmd}`", "",
             "**Scale and what differs from the paper.** The paper merges 12- and 17-layer MultiBERTs (d = 768, 110M "
             "parameters, pretrained on BooksCorpus + Wikipedia) finetuned on eight GLUE tasks. Ours: the zoo's "
             f"pre-LN BERT encoder (d = {s.dim}, {s.heads} heads, FFN {s.mlp}, {s.depth} layers, {s.seq} tokens, "
             f"WordPiece vocabulary of {vocab} trained here), pretrained by masked-language modelling with seeds "
             f"{list(s.seeds)} for {s.pretrain_epochs} epoch(s) over {corpus.shape[0]} sequences of WordNet 3.0 "
             "glosses and BBC News articles (their training splits); the deeper model repeats the even-numbered "
             f"layers (1-based {', '.join(str(p + 1) for p in sorted(set(s.repeat)))}) of each pretrained model before "
             f"finetuning: {s.depth} -> {deep} layers, layer order (1-based) "
             f"[{', '.join(str(i + 1) for i in order)}] (the paper: 12 -> 17). GLUE cannot be reached offline: our "
             "tasks are substitutes made from the installed packages (below), each finetuned for "
             f"{s.finetune_epochs} epoch(s) on at most {s.n_train} examples (AdamW, lr {s.finetune_lr:g}) from a "
             "classification head drawn once per task (the same for every seed and depth, as the paper keeps the "
             "head initialisations the same). Barriers along the linear path on at most "
             f"{s.n_test} test examples per task at {s.points} values of t (the paper: 21), alignment from "
             f"{s.samples} training inputs; every row is the mean ± std over the {n_pairs} pairs of seeds "
             "(i < j): vanilla averaging and homogeneous merging join the 4-layer models of seeds i and j, "
             f"heterogeneous merging the 4-layer model of seed i and the {deep}-layer model of seed j. Homogeneous "
             "merging aligns with `perm-acts` (activation matching, whole attention heads as units; the paper follows "
             "Verma et al.'s feature matching); heterogeneous merging depth-aligns (LMA: the paper's; SMA and CLA "
             "beside it), adds zero blocks to the 4-layer model (exactly the identity in a pre-LN encoder) and then "
             "aligns with `perm-acts`. Loss barrier = max over t of L(θ_t) − ((1 − t) L(θ_0) + t L(θ_1)) (Frankle et "
             "al.; `hetfuse.barrier`); the error barrier the same on the error (a fraction); the paper's eq. (3) "
             "subtracts the endpoints' mean instead (columns `*_eq3` of results.csv).", "",
             "Tasks (data read at run time from the installed packages, nothing committed; WordNet 3.0 licence; BBC "
             "News articles for research use only" +
             (f"; this run read {' and '.join(custom)} instead (e.g. the tests' made-up files)" if custom else "") +
             "):", ""]
    for name, t in task_data.items():
        lines.append(f"- `{name}`: {t.description}; {len(t.y_train)} training / {len(t.y_test)} test examples "
                     f"({t.source}).")
    lines += ["", "## Table IV beside ours", "",
              "Ours (loss barrier / error barrier, mean ± std over the pairs):", "",
              "| task | vanilla averaging: loss | error | homo merging: loss | error | hetero merging (LMA): loss | "
              "error |", "|---|---|---|---|---|---|---|"]
    for task in tasks:
        cells = []
        for kind in ("vanilla", "homo", "hetero"):
            label = PAPER_ROW[kind]
            cells += [fmt_ms(_vals(rows, task, label, "loss_barrier")),
                      fmt_ms(_vals(rows, task, label, "error_barrier"))]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "The paper's Table IV (GLUE; BERT 12 vs 17 layers):", "",
              "| task | vanilla averaging: loss | error | homo merging: loss | error | hetero merging: loss | error |",
              "|---|---|---|---|---|---|---|"]
    for task, r in PAPER_TABLE4.items():
        lines.append(f"| {task} | " + " | ".join(f"{r[k][0]:.2f} | {r[k][1]:.2f}" for k in ("vanilla", "homo",
                                                                                               "hetero")) + " |")
    lines += ["", "## Every row", "", "| task | method | loss barrier | error barrier | loss at t = 0.5 | "
              "error at t = 0.5 | eq. (3) loss barrier | depth alignment (1-based) |",
              "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for row in ROWS:
            maps = sorted({r["mapping"] for r in rows if r["task"] == task and r["method"] == row.label
                           and r["mapping"]})
            lines.append(f"| {task} | {row.label} | {fmt_ms(_vals(rows, task, row.label, 'loss_barrier'))} | "
                         f"{fmt_ms(_vals(rows, task, row.label, 'error_barrier'))} | "
                         f"{fmt_ms(_vals(rows, task, row.label, 'mid_loss'))} | "
                         f"{fmt_ms(_vals(rows, task, row.label, 'mid_error'))} | "
                         f"{fmt_ms(_vals(rows, task, row.label, 'loss_barrier_eq3'))} | {' '.join(maps)} |")
    lines += ["", "Finetuned models (test accuracy %, mean ± std over the seeds):", "",
              "| task | " + " | ".join(f"{d} layers" for d in (s.depth, deep)) + " |", "|---|---|---|"]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(
            fmt_ms([float(r["test_acc"]) for r in model_rows if r["task"] == task and r["depth"] == d])
            for d in (s.depth, deep)) + " |")
    if pre_rows:
        last = {}
        for r in pre_rows:
            last[r["seed"]] = r["mlm_loss"]
        lines += ["", "Masked-LM training loss of the last epoch per seed: " +
                  ", ".join(f"seed {k}: {v:.3f}" for k, v in last.items()) + "."]
    lines += ["", "## Verdict", ""] + _verdict(rows, tasks)
    lines += ["", f"Time: {timings['total_seconds'] / 60:.1f} min in all (data {timings['data_seconds']:.0f} s, "
              f"pretraining {timings['pretrain_seconds']:.0f} s, finetuning {timings['finetune_seconds']:.0f} s, "
              f"barriers {timings['barrier_seconds']:.0f} s; cached models cost nothing on a rerun); measured "
              "seconds per step in `timings.json`."]
    return "\n".join(lines) + "\n"


def _verdict(rows, tasks) -> list[str]:
    """How our rows order the three columns, beside the paper's count (loss barrier lower than vanilla averaging in
    6 of its 8 tasks for homogeneous merging and in 6 of 8 for heterogeneous merging)."""
    out = []
    paper = {k: sum(r[k][0] < r["vanilla"][0] for r in PAPER_TABLE4.values()) for k in ("homo", "hetero")}
    for kind in ("homo", "hetero"):
        lower = total = 0
        for task in tasks:
            v = _vals(rows, task, PAPER_ROW["vanilla"], "loss_barrier")
            m = _vals(rows, task, PAPER_ROW[kind], "loss_barrier")
            if v and m:
                total += 1
                lower += mean_std(m)[0] < mean_std(v)[0]
        what = "homogeneous merging" if kind == "homo" else "heterogeneous merging (LMA)"
        out.append(f"- Loss barrier of {what} below vanilla averaging's: {lower} of our {total} tasks (the paper: "
                   f"{paper[kind]} of {len(PAPER_TABLE4)}).")
    gaps = []
    for task in tasks:
        h = _vals(rows, task, PAPER_ROW["hetero"], "loss_barrier")
        o = _vals(rows, task, PAPER_ROW["homo"], "loss_barrier")
        if h and o:
            gaps.append(mean_std(h)[0] - mean_std(o)[0])
    if gaps:
        paper_gap = sum(r["hetero"][0] - r["homo"][0] for r in PAPER_TABLE4.values()) / len(PAPER_TABLE4)
        out.append(f"- Heterogeneous (LMA) minus homogeneous loss barrier, mean over our tasks: "
                   f"{sum(gaps) / len(gaps):+.3f} (the paper: {paper_gap:+.3f}, the two nearly equal).")
    for label in (r.label for r in ROWS if r.kind == "hetero" and r.label != PAPER_ROW["hetero"]):
        d = [mean_std(_vals(rows, t, label, "loss_barrier"))[0] - mean_std(_vals(rows, t, PAPER_ROW["hetero"],
                                                                                  "loss_barrier"))[0]
             for t in tasks if _vals(rows, t, label, "loss_barrier") and _vals(rows, t, PAPER_ROW["hetero"],
                                                                                "loss_barrier")]
        if d:
            out.append(f"- {label} minus LMA, loss barrier, mean over the tasks: {sum(d) / len(d):+.3f}.")
    return out


__all__ = ["DEFAULT_REPEAT", "MaskedLM", "PAPER_TABLE4", "ROWS", "SCALES", "TextScale", "finetune", "get_scale",
           "mask_tokens", "pretrain", "repeat_layers", "repeated_order", "run_text_barriers"]
