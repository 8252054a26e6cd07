"""The ``hetfuse`` command: train, fuse, eval, finetune, distill, deepen, transfer, check, demo, experiment."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from . import __version__
from .errors import HetfuseError
from .evaluate import (accuracies, check_dims, fused_head, fusion_accuracy, head_meta, load_models,
                       task_accuracies)



def _add_common(p: argparse.ArgumentParser, *, dataset: bool = True) -> None:
    if dataset:
        p.add_argument("--dataset", default="mnist",
                       help="mnist (default; reads <root>/mnist/), cifar10 (<root>/cifar10/), cifar100 "
                            "(<root>/cifar100/), idx:PATH (a folder with the four IDX files) or digits "
                            "(scikit-learn's bundled 8x8 digits, no files needed)")
        p.add_argument("--data-root", default=None,
                       help="folder holding the data sets (default: $HETFUSE_DATA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="with an error, also print its details")


_RESERVED = {"weights", "target", "samples", "repair_samples", "seed", "progress", "mapping", "preserve_until",
             "preserve_renorm", "positions"}


def _method_params(families=None) -> dict[str, tuple]:
    """Every parameter of every registered method (of ``families``, default all): name -> (ParamInfo,
    ["family:method", ...])."""
    from .registry import iter_methods, param_infos

    out: dict[str, tuple] = {}
    for family, cls in iter_methods():
        if families is not None and family not in families:
            continue
        for info in param_infos(cls):
            if info.name in _RESERVED:
                continue
            if info.name in out:
                out[info.name][1].append(cls.name)
            else:
                out[info.name] = (info, [cls.name])
    return out


_STAGES = ("similarity", "depth_align", "balance", "match", "repair")


def _names(family: str) -> list[str]:
    from .registry import methods

    return list(methods(family))


def _add_method_options(p: argparse.ArgumentParser, stages=_STAGES) -> None:
    """Flags for the stages and for every method parameter, generated from the registries."""
    from .registry import methods

    def names(family):
        return list(methods(family))

    p.set_defaults(method_stages=tuple(stages))
    if "similarity" in stages:
        p.add_argument("--representation", "--similarity", dest="similarity", default=None,
                       choices=names("similarity"),
                       help="layer similarity for depth alignment (default: the aligner's: neurons for cla, cka "
                            "for sma/lma)")
    if "depth_align" in stages:
        p.add_argument("--depth-align", default=None,
                       metavar="|".join(names("depth_align")).replace("fixed", "fixed:A,B,.."),
                       help="depth aligner (default cla); fixed:0,2,3 places the shallow units at those 0-based "
                            "deep positions")
    if "balance" in stages:
        p.add_argument("--balance", default=None, choices=names("balance"), help="depth balancer (default add)")
    if "match" in stages:
        p.add_argument("--match", default=None, choices=names("match"), help="neuron matcher (default ot-acts)")
    if "repair" in stages:
        p.add_argument("--repair", nargs="?", const="auto", default=None, choices=names("repair"),
                       help="statistics repair (default auto: BN reset where there is BatchNorm, REPAIR "
                            "elsewhere); --repair alone = auto")
        p.add_argument("--no-repair", dest="repair", action="store_const", const="none",
                       help="same as --repair none")
    from .registry import get_method, param_infos

    for name, (info, users) in _method_params(stages).items():
        flag = "--" + name.replace("_", "-")
        variants: dict[tuple, list[str]] = {}  # methods that share a parameter name may mean different things by it
        for user in users:
            cls = next(get_method(f, user) for f in stages if user in _names(f))
            own = next(i for i in param_infos(cls) if i.name == name)
            variants.setdefault((own.help, str(own.default)), []).append(user)
        helptext = "; ".join(f"{h} [{', '.join(us)}; default {d}]" for (h, d), us in variants.items())
        if info.annotation is bool:
            p.add_argument(flag, dest=f"param_{name}", action=argparse.BooleanOptionalAction, default=None,
                           help=helptext)
        elif _only_choices(info):
            p.add_argument(flag, dest=f"param_{name}", default=None, choices=list(info.choices), help=helptext)
        else:  # parsed (and refused with one clear line) by registry.parse_param in _config_from_args
            p.add_argument(flag, dest=f"param_{name}", default=None, metavar=_metavar(info), help=helptext)


def _only_choices(info) -> bool:
    """Whether a parameter takes nothing but a few names (argparse's choices), e.g. ``Literal["pre", "post"]``; a
    parameter that also takes another type (elastic-zip's ``width``: max|min|target or a list of ints) does not."""
    from .registry import union_args

    if info.choices is None or not all(isinstance(c, str) for c in info.choices):
        return False
    return all(get_origin(a) is Literal or a is type(None) for a in union_args(info.annotation))


def _metavar(info) -> str:
    """The flag's value as the CLI takes it, e.g. FLOAT, max|min|target|W1,W2,..."""
    from .registry import union_args

    parts = []
    for a in union_args(info.annotation):
        if a is type(None):
            continue
        if get_origin(a) is Literal:
            parts.append("|".join(str(v) for v in get_args(a)))
        elif get_origin(a) is list:
            parts.append("W1,W2,..." if info.name == "width" else "N1,N2,...")
        else:
            parts.append(getattr(a, "__name__", str(a)).upper())
    return "|".join(parts)


def _config_from_args(a, weights=None, **fixed):
    """The FusionConfig the flags describe: only the flags given are passed on (a method parameter that the
    chosen methods do not take is an error naming them). ``fixed``: options the command sets itself."""
    from .config import FusionConfig
    from .registry import parse_param

    params = {}
    for name, (info, _users) in _method_params(getattr(a, "method_stages", _STAGES)).items():
        v = getattr(a, f"param_{name}", None)
        if v is None:
            continue
        params[name] = v if isinstance(v, bool) else parse_param(info, v)
    depth = getattr(a, "depth_align", None)
    if depth is not None and depth.startswith("fixed:"):
        try:
            params["mapping"] = [int(v) for v in depth[len("fixed:"):].split(",") if v.strip()]
        except ValueError:
            raise HetfuseError(f"--depth-align {depth!r}: expected fixed:0,2,3 (0-based deep positions)") from None
        depth = "fixed"
    opts = dict(weights=weights, target=getattr(a, "target", None), similarity=getattr(a, "similarity", None),
                depth_align=depth, balance=getattr(a, "balance", None), match=getattr(a, "match", None),
                repair=getattr(a, "repair", None), samples=a.samples,
                repair_samples=getattr(a, "repair_samples", 2000), seed=a.seed, progress=not a.quiet)
    for run_option in ("preserve_until", "preserve_renorm", "positions"):  # given only where the command has the flag
        if getattr(a, run_option, None) is not None:
            opts[run_option] = getattr(a, run_option)
    opts.update(fixed)
    return FusionConfig(**opts, **params)


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    """The training options of finetune and distill."""
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (default 0.01)")
    p.add_argument("--schedule", choices=["cosine", "step", "onecycle", "constant"], default="cosine",
                   help="per-step schedule: cosine to 0 (default), step (x0.1 at 50%% and 75%%), onecycle, constant")
    p.add_argument("--batch-size", type=int, default=128,
                   help="global batch (default 128; split evenly over torchrun's processes)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="default 5e-4")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="default on")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="default 0")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (padding 4) + flip; default on for convolutional models, off for MLPs")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out share of the training set that picks the best epoch (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order and augmentation")
    p.add_argument("--limit", type=int, default=None,
                   help="use only this many training examples (a seeded random subset, --split-seed; quick runs)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for conv models")
    p.add_argument("--out", required=True,
                   help="output checkpoint (best epoch); F.log.csv and F.state.safetensors go beside it")
    p.add_argument("--restart", action="store_true", help="ignore (and replace) a previous run's state in --out")
    p.add_argument("--force", action="store_true", help="overwrite --out when it holds another checkpoint")
    p.add_argument("--allow-pickle", action="store_true")
    _add_common(p)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hetfuse", description="Fuse trained networks of different depths and widths.")
    ap.add_argument("--version", action="version", version=f"hetfuse {__version__}",
                    help="print the version (hetfuse X.Y.Z) and exit")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from the zoo",
                       description="Train a model from the zoo. Defaults that depend on --dataset: for cifar10 / "
                                   "cifar100, SGD with Nesterov momentum 0.9, lr 0.1 (the peak of a one-cycle "
                                   "schedule), weight decay 5e-4, label smoothing 0.1, batch 128, random crop + "
                                   "flip; otherwise (mnist, idx:PATH, digits) plain SGD at a constant lr 0.01, "
                                   "momentum 0.5, batch 64, no weight decay, smoothing or augmentation, as the "
                                   "paper. Every explicit flag overrides its default.")
    p.add_argument("--arch", required=True,
                   help="architecture, e.g. mlp:400,200,100, vgg11:w=0.25,bn, resnet18:w=0.25, resnet20:w=4, "
                        "vit:depth=4,dim=64,heads=4,patch=4")
    p.add_argument("--bias", action="store_true", help="give the Linear layers biases (default: none, as the paper)")
    p.add_argument("--split", default="all", choices=["all", "skill-a", "skill-b"],
                   help="skill-a: every image of label 4 plus 10%% of the others; skill-b: the rest")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the random skill split (default 0)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (peak lr with --schedule onecycle); default 0.1 for cifar, else 0.01")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum; default 0.9 for cifar, else 0.5")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov momentum; default on for cifar, off otherwise")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 for cifar, else 64")
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4 for cifar, else 0")
    p.add_argument("--classes", default=None,
                   help="train on these classes only, e.g. 6,7,3,0,5 (a task of a class split)")
    p.add_argument("--head", choices=["linear", "embed"], default="linear",
                   help="linear (default): one logit per class; embed: a 512-d output scored by 100 x cosine against "
                        "fixed seeded class embeddings, cross-entropy over the model's own classes (the shared output "
                        "space of class-split merging; CLIP's text embeddings replaced, see the README)")
    p.add_argument("--embed-dim", type=int, default=512, help="embedding size of --head embed (default 512)")
    p.add_argument("--embed-seed", type=int, default=0, help="seed of the class embeddings of --head embed")
    p.add_argument("--embed-scale", type=float, default=100.0,
                   help="cosine scale of --head embed (default 100, the papers'; the class-split CIFAR-10 "
                        "experiments use 10, see the README)")
    p.add_argument("--recipe", choices=["default", "zipit"], default="default",
                   help="default: the data set's defaults below; zipit: the recipe of ZipIt! and the heterogeneous-"
                        "merging paper (SGD momentum 0.9, weight decay 5e-4, peak lr 0.4 after a linear warm-up, "
                        "linear decay, batch 500, crop + flip)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="warm-up of --schedule warmup-linear (default 5%% of the epochs)")
    p.add_argument("--schedule", choices=["constant", "onecycle", "warmup-linear"], default=None,
                   help="learning-rate schedule, one-cycle stepped per batch; default onecycle for cifar, "
                        "else constant")
    p.add_argument("--label-smoothing", type=float, default=None, help="default 0.1 for cifar, else 0")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (padding 4) + horizontal flip of every batch; default on for cifar, else off")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last memory format for conv models (see results/train_speed/ for whether it "
                        "pays on your CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batch order and the "
                                                       "augmentation")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_common(p)

    p = sub.add_parser("fuse", help="fuse two or more checkpoints",
                       description="Fuse checkpoints: similarity -> depth aligner -> balancer -> neuron matcher -> "
                                   "repair (hetfuse methods lists every method and its parameters).")
    p.add_argument("models", nargs="+", help="checkpoints (.safetensors written by hetfuse)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--wb", type=float, default=None, help="weight of the second model (two models only); "
                                                          "the first gets 1 - wb")
    g.add_argument("--weights", default=None, help="comma-separated weights, one per model, summing to 1")
    p.add_argument("--target", type=int, default=None,
                   help="index of the model whose widths the fused model takes (default: the shallowest)")
    _add_method_options(p)
    p.add_argument("--samples", type=int, default=400,
                   help="alignment samples, drawn at random (with --seed) from the data set's training split")
    p.add_argument("--repair-samples", type=int, default=2000,
                   help="samples for the repair statistics (default 2000, or the whole training split if smaller)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positions", type=int, default=None, metavar="N",
                   help="per sample, at most N positions (pixels of a feature map, tokens) enter the matching "
                        "statistics, evenly spread, the same in every model (default: all, exact); faster for "
                        "convolutional networks and long token sequences")
    p.add_argument("--preserve-until", type=int, default=None, metavar="K",
                   help="keep the first K depth units of every model unmerged (one branch per model, their outputs "
                        "averaged) and merge from unit K on: a MultiBranch network; 0 or unset: the plain merge")
    p.add_argument("--preserve-renorm", action=argparse.BooleanOptionalAction, default=None,
                   help="with --preserve-until: give the averaged branch features the share-weighted mean and std of "
                        "the branches' own on the repair samples (default on)")
    p.add_argument("--out", required=True, help="fused checkpoint (.safetensors); the config goes beside it")
    p.add_argument("--report", default=None,
                   help="folder for the HTML report (index.html: configuration, depth-alignment matrices, matching "
                        "costs, accuracy of the inputs, their ensemble and the fused model on the test split), "
                        "report.json and the figures")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (torch.save) checkpoints: only for files you trust")
    _add_common(p)

    p = sub.add_parser("finetune", help="continue training a checkpoint (best epoch on a held-out split kept)",
                       description="Finetune a checkpoint with SGD. A seeded 10%% of the training set (--val-fraction, "
                                   "--split-seed) is held out and the epoch with the best accuracy on it is kept; "
                                   "the per-epoch log goes to F.log.csv beside --out and the last state to "
                                   "F.state.safetensors, from which a rerun with the same --out resumes. Runs "
                                   "unchanged under torchrun --nproc_per_node=K --no-python hetfuse finetune ... "
                                   "(DistributedDataParallel; --batch-size is the global batch).")
    p.add_argument("model", help="checkpoint to finetune")
    _add_fit_options(p)

    p = sub.add_parser("distill", help="knowledge distillation from a teacher into a student",
                       description="Hinton et al.: loss = alpha * T^2 * KL(softened teacher || softened student) + "
                                   "(1 - alpha) * cross-entropy. Same training options, outputs, resuming and "
                                   "torchrun support as finetune.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--student", required=True,
                   help="student checkpoint, or random:ARCH for a fresh network (e.g. random:vgg11:w=0.5), "
                        "initialised with --seed")
    p.add_argument("--temperature", type=float, required=True, help="softmax temperature T (> 0)")
    p.add_argument("--alpha", type=float, required=True, help="weight of the distillation term, in [0, 1]")
    _add_fit_options(p)

    p = sub.add_parser("deepen", help="the shallower model brought to a deeper one's depth (same function)",
                       description="Depth-align S to A and add identity layers / zero residual blocks at the "
                                   "unmatched positions (the pipeline's depth stages alone; CLAFusion's 'MB "
                                   "depth-aligned'). The result computes the same function as S.")
    p.add_argument("model", help="the shallower checkpoint S")
    p.add_argument("--like", required=True, help="the deeper checkpoint A whose depth S takes")
    _add_method_options(p, stages=("similarity", "depth_align"))
    p.add_argument("--samples", type=int, default=400, help="samples for the layer similarity (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--allow-pickle", action="store_true")
    _add_common(p)

    p = sub.add_parser("transfer", help="heterogeneous model transfer of SRC's layers into DST",
                       description="Copy SRC's convolution / Linear weights into DST's layers (HMT, Wang et al. "
                                   "2021): in order (--mapping chain, the longest chain) or along the cross-layer "
                                   "alignment (--mapping cla); DST keeps its weights elsewhere. --then avg averages "
                                   "the result with DST, --then ot fuses it with DST (OTFusion, DST's structure).")
    p.add_argument("src", help="source checkpoint")
    p.add_argument("dst", help="destination checkpoint (its architecture is the result's)")
    p.add_argument("--mapping", choices=["chain", "cla"], default="chain",
                   help="layer-to-layer mapping (default chain)")
    p.add_argument("--then", choices=["ot", "avg"], default=None, help="combine the transferred model with DST")
    _add_method_options(p)
    p.add_argument("--samples", type=int, default=400, help="alignment samples (default 400)")
    p.add_argument("--repair-samples", type=int, default=2000, help="repair samples of --then ot (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--allow-pickle", action="store_true")
    _add_common(p)

    p = sub.add_parser("methods", help="list the fusion methods of every stage and their parameters")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--markdown", nargs="?", const="table", default=None, choices=["table", "flags"],
                   help="print the README's method table (--markdown or --markdown table) or its list of the "
                        "stage and method-parameter flags (--markdown flags)")

    p = sub.add_parser("eval", help="test accuracy of checkpoints and of their prediction ensemble")
    p.add_argument("models", nargs="+")
    p.add_argument("--ensemble", action="store_true", help="also report the prediction ensemble")
    p.add_argument("--weights", default=None, help="ensemble weights, one per model (default uniform)")
    p.add_argument("--tasks", default=None,
                   help="class-split tasks, e.g. 6,7,3,0,5/2,8,4,9,1: report joint accuracy (argmax over every "
                        "class), each task's accuracy (argmax over its classes, on its images) and their mean")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-pickle", action="store_true")
    _add_common(p)

    p = sub.add_parser("barrier", help="loss and error barrier along the linear path between two checkpoints",
                       description="Loss (cross-entropy) and error (1 - accuracy) on the test split along "
                                   "theta_t = (1 - t) theta_A + t theta_B between the two networks, depth-balanced "
                                   "and aligned by the pipeline's stages (no repair), and the barriers of Frankle "
                                   "et al.: max over t of L(theta_t) - ((1 - t) L(theta_A) + t L(theta_B)).")
    p.add_argument("a", help="checkpoint A (t = 0)")
    p.add_argument("b", help="checkpoint B (t = 1)")
    p.add_argument("--points", type=int, default=21, help="evenly spaced values of t from 0 to 1 (default 21, at "
                                                          "least 3)")
    _add_method_options(p, stages=("similarity", "depth_align", "balance", "match"))
    from .registry import methods as _methods

    p.add_argument("--align", dest="match", default=None, choices=list(_methods("match")),
                   help="neuron matcher that aligns B to A before interpolating (the same as --match; default "
                        "ot-acts); none: vanilla averaging, no alignment")
    p.add_argument("--target", type=int, default=None, choices=[0, 1],
                   help="whose widths and neuron order the path takes (default: the shallower, A if equal)")
    p.add_argument("--samples", type=int, default=400,
                   help="alignment samples, drawn at random (with --seed) from the data set's training split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object (loss_barrier, error_barrier, the "
                                                       "curve ts, loss, error, ...)")
    p.add_argument("--out", default=None, help="folder for barrier.json, barrier.png and index.html (an HTML page)")
    p.add_argument("--force", action="store_true", help="overwrite the files of an earlier run in --out")
    p.add_argument("--allow-pickle", action="store_true")
    _add_common(p)

    p = sub.add_parser("check", help="permutation self-check of a checkpoint's network description")
    p.add_argument("model")
    p.add_argument("--image-size", type=int, default=32, help="height and width of the random test images fed to "
                                                              "convolutional models (default 32)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per random test sequence of a model that reads "
                                                           "token ids and has no position embedding to tell "
                                                           "(default 16)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="train two heterogeneous MLPs on the bundled digits and fuse them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("experiment", help="paper reproductions (MNIST MLPs; CIFAR-10 CNNs scaled to a CPU)")
    p.add_argument("name", choices=["skill-transfer", "ablation", "multi-model", "cifar-resnet", "cifar-vgg",
                                    "skill-transfer-methods", "skill-transfer-gap", "class-split-mnist",
                                    "class-split-cifar-resnet", "class-split-cifar-vgg", "class-split-width",
                                    "class-split-converged-resnet", "class-split-converged-vgg",
                                    "class-split-converged-width", "class-split-gap-mnist",
                                    "class-split-gap-converged-resnet", "class-split-vit-mnist",
                                    "cifar-converged-resnet", "cifar-converged-vgg", "clafusion-table1",
                                    "clafusion-table2", "clafusion-table3", "clafusion-table4", "parents",
                                    "text-barriers"])
    p.add_argument("--seeds", default=None, help="e.g. 0-4 or 0,2,3 (default 0-4; class-split-converged-*: 0, the "
                                                 "committed parents' seeds)")
    p.add_argument("--out", required=True, help="output folder; one that already holds results needs --force")
    p.add_argument("--force", action="store_true", help="replace results already in --out")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs of each parent (default 10; class-split: 10 MNIST, 15 CIFAR-10)")
    p.add_argument("--samples", type=int, default=400, help="alignment (and repair) samples (default 400)")
    p.add_argument("--width", type=float, default=None, help="class-split CIFAR: width multiplier of the models")
    p.add_argument("--splits", type=int, default=None, help="class-split: how many class splits (default 5 MNIST, "
                                                            "2 CIFAR-10)")
    p.add_argument("--resume", action="store_true",
                   help="class-split and clafusion-table*: keep the rows of an interrupted run in --out and compute "
                        "the missing ones")
    p.add_argument("--finetune-epochs", type=int, default=2,
                   help="clafusion-table*: epochs of every finetune, retraining or distillation (default 2)")
    p.add_argument("--temperatures", default="20,10,8,4,1",
                   help="clafusion-table4: distillation temperatures (default 20,10,8,4,1)")
    p.add_argument("--alphas", default="0.7,0.1",
                   help="clafusion-table4: distillation weights alpha, tried in this order (default 0.7,0.1; the "
                        "paper's grid is 0.05,0.1,0.5,0.7,0.95,0.99)")
    p.add_argument("--committed-only", action="store_true",
                   help="class-split-converged-*: compute only the rows whose parents are committed in "
                        "results/parents (the others are listed as waiting; --resume fills them in later) instead "
                        "of training the missing parents first (hours)")
    p.add_argument("--only", default=None,
                   help="parents: comma-separated entries to train (default: every entry, in order)")
    p.add_argument("--scale", default=None, choices=["full", "tiny", "smoke"],
                   help="text-barriers: model and data sizes (default $HETFUSE_TEXT_SCALE, else full: about 2 h on "
                        "2 cores; tiny: a few minutes; smoke: the CI test's); --seeds (default 0-2), --epochs "
                        "(finetuning) and --samples override it")
    p.add_argument("--data-root", default=None)
    p.add_argument("--quiet", action="store_true")
    return ap


def _parse_weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise HetfuseError(f"--weights must be comma-separated numbers, got {text!r}") from None


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise HetfuseError(f"output exists: {', '.join(existing)} (pass --force to overwrite)")


def cmd_train(a) -> int:
    from .data import load_dataset
    from .io import save_checkpoint
    from .train import OutputHead, parse_classes
    from .train.recipes import CIFAR_TRAIN_DEFAULTS, train_from_spec, train_settings

    out = Path(a.out)
    _refuse_existing([out], a.force)
    if a.epochs < 1:
        raise HetfuseError("--epochs must be at least 1")
    cfg = train_settings(a.dataset, a.recipe, **{k: getattr(a, k) for k in CIFAR_TRAIN_DEFAULTS})
    if cfg["batch_size"] < 1:
        raise HetfuseError("--batch-size must be at least 1")
    classes = parse_classes(a.classes)
    if classes is not None and a.split != "all":
        raise HetfuseError("--classes and --split select training examples in two ways: give one of them")
    ds = load_dataset(a.dataset, a.data_root)
    if not a.embed_scale > 0:
        raise HetfuseError(f"--embed-scale must be positive, got {a.embed_scale}")
    head = OutputHead(a.head, ds.num_classes, classes, dim=a.embed_dim, seed=a.embed_seed, scale=a.embed_scale)
    if ds.note:
        print(f"note: {ds.note}")
    model, meta = train_from_spec(ds, a.arch, head=head, settings=cfg, epochs=a.epochs, seed=a.seed, bias=a.bias,
                                  split=a.split, split_seed=a.split_seed, classes=classes,
                                  channels_last=a.channels_last, warmup_epochs=a.warmup_epochs, progress=not a.quiet)
    for h in meta["history"]:
        print(f"epoch {h['epoch']}/{a.epochs}: loss {h['loss']:.4f}, train accuracy {h['train_acc']:.2f}%, "
              f"{h['seconds']:.2f} s")
    meta = dict(meta, dataset=a.dataset, recipe=a.recipe)
    save_checkpoint(model, out, metadata=meta, force=a.force)
    what = f"classes {','.join(map(str, classes))}" if classes is not None else a.split
    extra = f" (on its own classes {meta['task_accuracy']:.2f}%)" if classes is not None else ""
    print(f"{out}: {a.arch} trained on {a.dataset} ({what}, {meta['train_examples']} examples), test accuracy "
          f"{meta['test_accuracy']:.2f}%{extra}")
    return 0


def cmd_fuse(a) -> int:
    from .data import load_dataset
    from .io import save_checkpoint
    from .pipeline import fuse

    if len(a.models) < 2:
        raise HetfuseError("fuse needs at least two checkpoints")
    out = Path(a.out)
    config_path = out.with_name(out.name.removesuffix(".safetensors") + ".config.json")
    outputs = [out, config_path]
    report_dir = Path(a.report) if a.report else None
    if report_dir is not None:
        outputs.append(report_dir / "report.json")
    _refuse_existing(outputs, a.force)
    if a.wb is not None:
        if len(a.models) != 2:
            raise HetfuseError(f"--wb is the weight of the second model and needs exactly two models, got "
                               f"{len(a.models)}; use --weights")
        if not 0.0 <= a.wb <= 1.0:
            raise HetfuseError(f"--wb must lie in [0, 1], got {a.wb}")
        weights = [1.0 - a.wb, a.wb]
    else:
        weights = _parse_weights(a.weights, len(a.models))
    config = _config_from_args(a, weights).validate(len(a.models))
    models, metas = load_models(a.models, a.allow_pickle)
    ds = load_dataset(a.dataset, a.data_root)
    check_dims(models, ds, a.models, metas)
    fhead = fused_head(metas, ds, a.models)
    result = fuse(models, ds.x_train, config=config)
    report = dict(result.report, inputs=[str(p) for p in a.models], dataset=a.dataset,
                  alignment_samples=f"{result.report['samples']} random training images (seed {a.seed})")
    save_checkpoint(result.model, out, metadata={"fused_from": [str(p) for p in a.models], "config": config.to_dict(),
                                                 "dataset": a.dataset, **fhead}, force=a.force)
    _atomic_write(config_path, config.to_json() + "\n")
    if report_dir is not None:
        from .report import plot_alignment_matrices
        from .report.html import write_fusion_report

        report["figures"] = plot_alignment_matrices(report, report_dir)
        report["accuracy"] = fusion_accuracy(a.models, models, metas, result.model, fhead, ds, config.weights)
        _atomic_write(report_dir / "report.json", json.dumps(report, indent=2) + "\n")
        write_fusion_report(report_dir, report, accuracy=report["accuracy"])
    from .report.tables import describe_alignment

    widths = ",".join(str(w) for w in result.report["fused_widths"])
    maps = "; ".join(describe_alignment(m) for m in result.report["mappings"] if m["changed"])
    print(f"{out}: fused {len(models)} models (weights {config.weights}) into hidden widths {widths}"
          + (f"; depth alignment, shallow unit → deep unit (1-based): {maps}" if maps else ""))
    return 0


def stage_flags_markdown() -> str:
    """The README's list of ``fuse``'s stage flags and method-parameter flags, rendered from the parser (so from
    the registries: every method name, every parameter), as ``hetfuse methods --markdown flags`` prints it."""
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    lines = []
    for act in sub.choices["fuse"]._actions:
        if act.dest not in _STAGES and not act.dest.startswith("param_"):
            continue
        positive = [o for o in act.option_strings if not o.startswith("--no-")]
        negation = [o for o in act.option_strings if o.startswith("--no-")] if positive else []
        flag, *aliases = positive or act.option_strings
        if act.choices is not None:
            values = "|".join(act.choices)
            values = f" [{values}]" if act.nargs == "?" else f" {values}"
        elif act.metavar is not None:
            values = f" {act.metavar}"
        else:
            values = ""
        names = f"`{flag}{values}`" + "".join(f" / `{o}`" for o in negation)
        alias = f" (alias {', '.join(f'`{o}`' for o in aliases)})" if aliases else ""
        helptext = " ".join((act.help or "").replace("%%", "%").split())
        lines.append(f"- {names}{alias}: {helptext}")
    return "\n".join(lines)


def cmd_methods(a) -> int:
    from .registry import describe_methods, methods_markdown

    if a.json:
        print(json.dumps(describe_methods(), indent=2))
    elif a.markdown == "flags":
        print(stage_flags_markdown())
    elif a.markdown:
        print(methods_markdown())
    else:
        for fam in describe_methods():
            print(f"{fam['family']} ({fam['title']}):")
            for m in fam["methods"]:
                print(f"  {m['name']:<14} {m['description']}")
                for p in m["params"]:
                    print(f"  {'':<14}   {p['name']} = {p['default']!r} ({p['type']}): {p['help']}")
    return 0


def _fit_run(a, model, heads: dict, *, teacher=None, source: dict) -> int:
    """finetune / distill: fit ``model`` on --dataset, write the checkpoint (rank 0) and print its accuracy."""
    from .data import load_dataset
    from .graph import describe
    from .io import save_checkpoint
    from .multihead import MultiHead
    from .train import FitSettings, OutputHead, fit, predict_logits, task_metrics
    from .train.fitting import distributed, log_path, remove_state, state_path

    out = Path(a.out)
    state, log = state_path(out), log_path(out)
    rank, world = distributed()
    if a.restart:
        if rank == 0:
            remove_state(state)
            log.unlink(missing_ok=True)
    elif out.exists() and not state.exists() and not a.force:
        raise HetfuseError(f"output exists: {out} (not a run to resume: pass --force to overwrite it)")
    if isinstance(model, MultiHead):
        raise HetfuseError("a multi-head network cannot be finetuned as one classifier")
    ds = load_dataset(a.dataset, a.data_root)
    head = OutputHead.from_dict(heads.get("head"), ds.num_classes)
    if head.classes is not None:
        raise HetfuseError("the checkpoint is a class-split task model (its head covers some classes only); "
                           "finetune and distill train on every class")
    from .branches import MultiBranch

    conv = describe(model.path(0) if isinstance(model, MultiBranch) else model).image_input
    augment = conv if a.augment is None else a.augment
    if augment and not conv:
        raise HetfuseError("--augment crops images, but the model is an MLP; pass --no-augment")
    flat = (lambda t: t) if conv or ds.x_train.ndim == 2 else (lambda t: t.reshape(t.shape[0], -1))
    settings = FitSettings(epochs=a.epochs, lr=a.lr, momentum=a.momentum, nesterov=a.nesterov,
                           weight_decay=a.weight_decay, batch_size=a.batch_size, schedule=a.schedule,
                           label_smoothing=a.label_smoothing, augment=augment, seed=a.seed,
                           val_fraction=a.val_fraction, split_seed=a.split_seed,
                           temperature=getattr(a, "temperature", None), alpha=getattr(a, "alpha", None),
                           channels_last=a.channels_last)
    if ds.note and rank == 0:
        print(f"note: {ds.note}")
    meta = dict(heads, dataset=a.dataset, **source)
    x_train, y_train = flat(ds.x_train), ds.y_train
    if a.limit is not None:
        import torch

        if not 0 < a.limit <= x_train.shape[0]:
            raise HetfuseError(f"--limit must lie in [1, {x_train.shape[0]}], got {a.limit}")
        keep = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(a.split_seed))[:a.limit]
        x_train, y_train = x_train[keep.sort().values], y_train[keep.sort().values]
        meta["train_limit"] = a.limit
    res = fit(model, x_train, y_train, settings, out=out, teacher=teacher,
              head=head if head.kind != "linear" else None, progress=not a.quiet, metadata=meta)
    if rank != 0:
        return 0
    scores = head.scores(predict_logits(res.model, flat(ds.x_test)))
    acc = task_metrics(scores, ds.y_test, [list(range(ds.num_classes))])["joint"]
    final = dict(meta, fit=res.settings, best_epoch=res.best_epoch, best_val=res.best_val, history=res.history,
                 test_accuracy=acc, processes=world)
    save_checkpoint(res.model, out, metadata=final, force=True)
    if not a.quiet:
        for h in res.history[res.resumed_from:]:
            print(f"epoch {h['epoch']}/{a.epochs}: loss {h['loss']:.4f}, train {h['train_acc']:.2f}%, held-out "
                  f"{h['val_acc']:.2f}%, {h['seconds']:.1f} s")
    resumed = f", resumed after epoch {res.resumed_from}" if res.resumed_from else ""
    print(f"{out}: best epoch {res.best_epoch}/{a.epochs} (held-out {res.best_val:.2f}%{resumed}), test accuracy "
          f"{acc:.2f}% ({world} process{'es' if world > 1 else ''})")
    return 0


def cmd_finetune(a) -> int:
    models, metas = load_models([a.model], a.allow_pickle)
    return _fit_run(a, models[0], head_meta(metas[0]), source={"finetuned_from": a.model})


def _student(spec: str, ds, seed: int, allow_pickle: bool):
    import torch

    from .models import model_from_arch, parse_arch

    if spec.startswith("random:"):
        arch_spec = spec[len("random:"):]
        try:
            arch = parse_arch(arch_spec, input_dim=ds.input_dim, output_dim=ds.num_classes, input_shape=ds.input_shape)
        except ValueError as e:
            raise HetfuseError(f"--student {spec!r}: {e}") from None
        torch.manual_seed(seed)
        return model_from_arch(arch), {"arch_spec": arch_spec}
    models, metas = load_models([spec], allow_pickle)
    return models[0], metas[0]


def cmd_distill(a) -> int:
    from .data import load_dataset

    teachers, tmetas = load_models([a.teacher], a.allow_pickle)
    ds = load_dataset(a.dataset, a.data_root)
    student, smeta = _student(a.student, ds, a.seed, a.allow_pickle)
    check_dims([teachers[0], student], ds, [a.teacher, a.student], [tmetas[0], smeta])
    for who, meta in (("teacher", tmetas[0]), ("student", smeta)):
        if (meta.get("head") or {}).get("kind", "linear") != "linear":
            raise HetfuseError(f"the {who} has an embedding head; distillation matches class logits")
    return _fit_run(a, student, head_meta(smeta), teacher=teachers[0],
                    source={"distilled_from": a.teacher, "student_init": a.student,
                            "temperature": a.temperature, "alpha": a.alpha})


def _two_checkpoints(a, paths: list[str]):
    """deepen / transfer: the output path (refused if it exists), the two models, their metadata, the data set."""
    from .data import load_dataset

    out = Path(a.out)
    _refuse_existing([out], a.force)
    models, metas = load_models(paths, a.allow_pickle)
    ds = load_dataset(a.dataset, a.data_root)
    check_dims(models, ds, paths, metas)
    return out, models, metas, ds


def cmd_deepen(a) -> int:
    from .io import save_checkpoint
    from .report.tables import describe_alignment
    from .transfer import deepen

    out, models, metas, ds = _two_checkpoints(a, [a.model, a.like])
    config = _config_from_args(a, balance="add", target=1)
    model, alignment = deepen(models[0], models[1], ds.x_train, config=config)
    save_checkpoint(model, out, metadata=dict(head_meta(metas[0]), dataset=a.dataset, deepened_from=a.model,
                                              like=a.like, alignment=alignment, config=config.to_dict()),
                    force=a.force)
    print(f"{out}: {a.model} deepened to the depth of {a.like}; shallow unit → deep unit (1-based): "
          f"{describe_alignment(alignment)}")
    return 0


def cmd_transfer(a) -> int:
    from .io import save_checkpoint
    from .transfer import transfer

    out, models, metas, ds = _two_checkpoints(a, [a.src, a.dst])
    config = _config_from_args(a, target=1)
    res = transfer(models[0], models[1], ds.x_train, mapping=a.mapping, then=a.then, config=config)
    report = {k: v for k, v in res.report.items() if k != "fusion"}
    save_checkpoint(res.model, out, metadata=dict(head_meta(metas[1]), dataset=a.dataset, transferred_from=a.src,
                                                  into=a.dst, transfer=report, config=config.to_dict()),
                    force=a.force)
    then = {"ot": ", then fused with DST (OT)", "avg": ", then averaged with DST", None: ""}[a.then]
    print(f"{out}: {len(res.pairs)} layers of {a.src} copied into {a.dst} along the {a.mapping} mapping{then}")
    return 0


def _atomic_write(path: Path, text: str) -> None:
    from .io.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


def cmd_eval(a) -> int:
    from .data import load_dataset

    if a.weights is not None and not a.ensemble:
        raise HetfuseError("--weights sets the ensemble's weights: pass --ensemble with it")
    models, metas = load_models(a.models, a.allow_pickle)
    ds = load_dataset(a.dataset, a.data_root)
    check_dims(models, ds, a.models, metas)
    if a.tasks is not None:
        return _eval_tasks(a, models, metas, ds)
    accs, ens, weights = accuracies(models, ds, _parse_weights(a.weights, len(models)), a.ensemble)
    if a.json:
        rows = [{"path": p, "accuracy": acc} for p, acc in zip(a.models, accs, strict=True)]
        print(json.dumps({"dataset": a.dataset, "models": rows,
                          "ensemble": None if ens is None else {"weights": weights, "accuracy": ens}}))
    else:
        width = max(len(p) for p in a.models)
        for p, acc in zip(a.models, accs, strict=False):
            print(f"{p:<{width}}  {acc:6.2f}%")
        if ens is not None:
            print(f"{'ensemble':<{width}}  {ens:6.2f}%  (weights {weights})")
    return 0


def _eval_tasks(a, models, metas, ds) -> int:
    from .train import parse_tasks

    tasks = parse_tasks(a.tasks)
    if a.ensemble and a.weights is not None:
        raise HetfuseError("the ensemble of task models (--tasks) scores each class with the model trained on "
                           "it; it takes no --weights")
    scores, ens = task_accuracies(models, metas, ds, tasks, a.ensemble)
    rows = [dict(path=p, **r) for p, r in zip(a.models, scores, strict=True)]
    if a.json:
        print(json.dumps({"dataset": a.dataset, "tasks": tasks, "models": rows, "ensemble": ens}))
        return 0
    width = max(len(p) for p in a.models + ["ensemble"])
    head = "  ".join(f"task {k}" for k in range(len(tasks)))
    print(f"{'':<{width}}  joint   {head}  per-task avg")
    for r in rows + ([dict(path="ensemble", **ens)] if ens else []):
        cells = "  ".join(f"{t:6.2f}" for t in r["tasks"])
        print(f"{r['path']:<{width}}  {r['joint']:6.2f}  {cells}  {r['per_task_avg']:6.2f}")
    return 0


def cmd_check(a) -> int:
    import torch

    from .branches import MultiBranch
    from .graph import check_permutation_invariance, describe

    models, _ = load_models([a.model], a.allow_pickle)
    model = models[0].eval()
    # a multi-branch network (--preserve-until) is checked as each branch followed by the tail
    parts = [model.path(i) for i in range(len(model.branches))] if isinstance(model, MultiBranch) else [model]
    g = describe(parts[0])
    gen = torch.Generator().manual_seed(a.seed)
    if g.token_input:  # token ids; as many tokens as a position embedding has rows, if it has one
        seq = next((t.shape[-2] for k, t in model.state_dict().items() if t.dim() == 3 and t.shape[0] == 1
                    and "pos" in k), a.seq_len)
        x = torch.randint(0, g.input_dim, (16, seq), generator=gen)
        what = f"random token ids (16 x {seq}; --seq-len)"
    else:
        shape = (g.input_dim, a.image_size, a.image_size) if g.image_input else (g.input_dim,)
        x = torch.randn(16, *shape, generator=gen)
        what = f"random {'x'.join(map(str, shape))} inputs" + (" (--image-size)" if g.image_input else "")
    import contextlib
    import io

    try:  # (a traced model prints its own account of the failure to stderr: kept out of the one-line error)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            model(x)
    except RuntimeError as e:
        raise HetfuseError(f"{a.model} does not run on {what}: {str(e).splitlines()[0]}") from None
    diff = 0.0
    for part in parts:
        g = describe(part, example=x[:2])
        diff = max(diff, check_permutation_invariance(part, g, x, seed=a.seed))
    what = f"a multi-branch network, each of its {len(parts)} branches with its tail: " if len(parts) > 1 else ""
    print(f"{a.model}: {what}{g.depth} hidden neuron spaces {g.widths}; permuting all of them changed the outputs by "
          f"{diff:.3g}: OK")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    print(run_demo(seed=a.seed, progress=not a.quiet))
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HetfuseError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise HetfuseError(f"{flag}: no values")
    return vals


def cmd_experiment(a) -> int:
    from .experiments import (parse_seeds, run_ablation, run_cifar_experiment, run_clafusion_table, run_class_split,
                              run_multi_model, run_skill_methods, run_skill_transfer)
    from .experiments.common import command_line

    if a.name == "parents":
        from .experiments.parents import run_parents

        only = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else None
        for folder in run_parents(data_root=a.data_root, out_dir=a.out, only=only, progress=not a.quiet):
            print(f"parent {folder.name}: {(folder / 'accuracy.json').read_text().strip()}")
        return 0
    if a.only is not None:
        raise HetfuseError("--only belongs to the parents experiment")
    if a.scale is not None and a.name != "text-barriers":
        raise HetfuseError("--scale belongs to the text-barriers experiment")
    if a.name == "text-barriers":
        from .experiments.text_barriers import run_text_barriers

        if a.width is not None or a.splits is not None or a.committed_only:
            raise HetfuseError("--width, --splits and --committed-only belong to the class-split experiments")
        # --samples keeps its default of 400 (the full scale's) unless given: the smaller scales use fewer
        run_text_barriers(out_dir=a.out, scale=a.scale, seeds=parse_seeds(a.seeds) if a.seeds else None,
                          samples=a.samples if a.samples != 400 else None, epochs=a.epochs, resume=a.resume,
                          force=a.force, progress=not a.quiet, command=command_line())
        from .report.html import write_experiment_report

        page = write_experiment_report(a.out)
        print(f"{a.name}: results in {a.out} (report: {page})")
        return 0
    converged = a.name.startswith("class-split-") and "converged-" in a.name
    if a.committed_only and not converged:
        raise HetfuseError("--committed-only belongs to the class-split-converged-* experiments")
    seeds = parse_seeds(a.seeds or ("0" if converged else "0-4"))
    kwargs = dict(data_root=a.data_root, seeds=seeds, out_dir=a.out, samples=a.samples, progress=not a.quiet,
                  force=a.force, command=command_line())
    table = a.name.startswith("clafusion-table")
    if not table and (a.finetune_epochs != 2 or a.temperatures != "20,10,8,4,1" or a.alphas != "0.7,0.1"):
        raise HetfuseError("--finetune-epochs, --temperatures and --alphas belong to the clafusion-table experiments")
    if a.name.startswith("class-split-"):
        run_class_split(a.name.removeprefix("class-split-"), epochs=a.epochs, width=a.width, splits=a.splits,
                        resume=a.resume, committed_only=a.committed_only, **kwargs)
    elif table:
        if a.width is not None or a.splits is not None:
            raise HetfuseError("--width and --splits belong to the class-split experiments")
        run_clafusion_table(int(a.name.removeprefix("clafusion-table")), epochs=10 if a.epochs is None else a.epochs,
                            finetune_epochs=a.finetune_epochs, temperatures=_floats(a.temperatures, "--temperatures"),
                            alphas=_floats(a.alphas, "--alphas"), resume=a.resume, **kwargs)
    else:
        if a.width is not None or a.splits is not None or a.resume:
            raise HetfuseError("--width, --splits and --resume belong to the class-split and clafusion-table "
                               "experiments")
        if "converged" in a.name and a.epochs is not None:
            raise HetfuseError("the converged experiments use the committed parents as they are: --epochs does not "
                               "apply")
        kwargs["epochs"] = 10 if a.epochs is None else a.epochs
        if a.name.startswith("cifar-"):
            run_cifar_experiment(a.name.removeprefix("cifar-"), **kwargs)
        else:
            if a.name == "skill-transfer-gap":
                from .experiments.skill_methods import GAP_GRID

                kwargs["grid"] = GAP_GRID
            fn = {"skill-transfer": run_skill_transfer, "ablation": run_ablation, "multi-model": run_multi_model,
                  "skill-transfer-methods": run_skill_methods, "skill-transfer-gap": run_skill_methods}[a.name]
            fn(**kwargs)
    from .report.html import write_experiment_report

    page = write_experiment_report(a.out)
    print(f"{a.name}: results in {a.out} (report: {page})")
    return 0


def cmd_barrier(a) -> int:
    from .barriers import barrier
    from .data import load_dataset
    from .train import OutputHead

    out = Path(a.out) if a.out else None
    if out is not None:
        _refuse_existing([out / "barrier.json", out / "barrier.png", out / "index.html"], a.force)
    if a.points < 3:
        raise HetfuseError(f"--points must be at least 3 (t = 0, 1 and a point between), got {a.points}")
    if a.samples < 1:
        raise HetfuseError(f"--samples must be at least 1, got {a.samples}")
    paths = [a.a, a.b]
    config = _config_from_args(a, repair="none").validate(2)
    models, metas = load_models(paths, a.allow_pickle)
    ds = load_dataset(a.dataset, a.data_root)
    check_dims(models, ds, paths, metas)
    head = OutputHead.from_dict(fused_head(metas, ds, paths)["head"], ds.num_classes)
    res = barrier(models[0], models[1], ds, a.points, config=config, head=head if head.kind != "linear" else None)
    data = dict(models=paths, dataset=a.dataset, split="test", points=a.points, **res.to_dict(),
                head=head.to_dict(), config=config.to_dict(),
                alignment_samples=f"{config.samples} random training images (seed {a.seed})")
    if out is not None:
        from .report.figures import plot_barrier
        from .report.html import write_barrier_report

        out.mkdir(parents=True, exist_ok=True)
        plot_barrier(data, out / "barrier.png", title=f"{Path(a.a).name} → {Path(a.b).name} ({a.dataset}, "
                                                        f"matcher {res.match})",
                     labels=(Path(a.a).name, Path(a.b).name))
        _atomic_write(out / "barrier.json", json.dumps(data, indent=2) + "\n")
        write_barrier_report(out, data)
    if a.json:
        print(json.dumps(data))
        return 0
    embed = "; embedding heads: every class scored, as eval --tasks' joint accuracy" if head.kind == "embed" else ""
    print(f"{a.a} → {a.b} on the {a.dataset} test split ({res.examples} examples{embed}), {a.points} points, "
          f"matcher {res.match}: loss barrier {res.loss_barrier:.4f} at t = {res.t_loss:.2f}, error barrier "
          f"{100 * res.error_barrier:.2f} points at t = {res.t_error:.2f}")
    for name, i, k in (("A", 0, 0), ("B", 1, -1)):
        print(f"  {name}: loss {res.model_loss[i]:.4f}, error {100 * res.model_error[i]:.2f}% (aligned endpoint: "
              f"loss {res.loss[k]:.4f}, error {100 * res.error[k]:.2f}%)")
    if out is not None:
        print(f"  curve, figure and page in {out} (index.html)")
    return 0


COMMANDS = {"train": cmd_train, "fuse": cmd_fuse, "eval": cmd_eval, "check": cmd_check, "demo": cmd_demo,
            "experiment": cmd_experiment, "methods": cmd_methods, "finetune": cmd_finetune, "distill": cmd_distill,
            "deepen": cmd_deepen, "transfer": cmd_transfer, "barrier": cmd_barrier}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except HetfuseError as exc:
        print(f"hetfuse {args.command}: error: {exc.cli_message or exc}", file=sys.stderr)
        details = getattr(exc, "details", None)
        if details and getattr(args, "verbose", False):
            print(details, file=sys.stderr)
        elif details:
            print("(--verbose for details)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
