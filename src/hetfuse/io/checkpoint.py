"""Checkpoints: safetensors files that describe how to rebuild the model without executing code.

A checkpoint holds the tensors and, in its metadata, the model's *base* — ``{"zoo": arch}`` for a model of
hetfuse's zoo, ``{"sequential": [...]}`` for a plain ``nn.Sequential`` of standard torch layers (its layers and
their constructor arguments, :mod:`hetfuse.io.sequential`), ``{"class": "module.QualName"}`` for a user's class
(rebuilt from a fresh instance the caller passes as ``base=``) — and the structural *edits* made to it
(identity layers and zero blocks inserted, layers folded, layers resized, biases added;
:mod:`hetfuse.graph.rewrite`), as data.

Loading treats the file as untrusted: the base and the edits are first replayed on the ``meta`` device (no
memory is allocated) and the resulting parameter names and shapes must equal the tensors' before anything
real is built; pickle files are refused unless explicitly allowed.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import CheckpointError, HetfuseError
import contextlib

FORMAT = "hetfuse"
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"}
_ZIP_MAGIC = b"PK\x03\x04"


def _check_finite(tensors: dict[str, torch.Tensor], path, action: str) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{action} {path}: parameter(s) {', '.join(bad)} contain NaN or Inf")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, writer, *, suffix: str = ".tmp") -> None:
    """Write a file atomically (temporary file + rename) with the permissions the umask gives a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_model(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None,
               force: bool = False) -> Path:
    """Write ``model`` to ``path`` as a safetensors checkpoint (atomically): its tensors, its base and its edits
    (see the module docstring), and ``metadata`` (any JSON-able dict). Returns the path."""
    from safetensors.torch import save_file

    from .sequential import base_and_edits

    path = Path(path)
    if path.exists() and path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    if path.exists() and not force:
        what = f"refusing to overwrite existing checkpoint {path}"
        raise CheckpointError(f"{what} (pass force=True to replace it)",
                              cli_message=f"{what} (pass --force to replace it)")
    from ..branches import MultiBranch
    from ..multihead import MultiHead

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    _check_finite(tensors, path, "refusing to save checkpoint")
    try:
        meta = {"format": FORMAT, "hetfuse_version": __version__,
                "extra": json.dumps(metadata if metadata is not None else {})}
        if isinstance(model, MultiHead):
            parts = [model.trunk, *model.heads]
            meta["multihead"] = json.dumps([{"base": b, "edits": e} for b, e in map(base_and_edits, parts)])
        elif isinstance(model, MultiBranch):
            meta["multibranch"] = json.dumps({
                "branches": [{"base": b, "edits": e} for b, e in map(base_and_edits, model.branches)],
                "tail": dict(zip(("base", "edits"), base_and_edits(model.tail), strict=True)),
                "features": model.features, "feature_axis": model.feature_axis})
        else:
            base, edits = base_and_edits(model)
            meta["base"] = json.dumps(base)
            meta["edits"] = json.dumps(edits)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save checkpoint {path}: metadata is not JSON-serialisable ({e})") from None
    try:
        atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"failed to write checkpoint {path}: {e}") from e
    return path


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None,
                    force: bool = False) -> Path:
    """Same as :func:`save_model` (the name the CLI and experiments use)."""
    return save_model(model, path, metadata=metadata, force=force)


# ----------------------------------------------------------------------------------------------- loading


def _looks_like_pickle(path: Path, head: bytes) -> bool:
    return head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80" or path.suffix.lower() in PICKLE_SUFFIXES


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a safetensors checkpoint (it looks like a pickle / torch.save file). Loading pickle files "
        "can run arbitrary code; if you trust this file, pass --allow-pickle (allow_pickle=True)")


def _class_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _build(base_desc: dict, edits: list, base: nn.Module | None, path: Path, n_tensors: int,
           device: torch.device | str) -> nn.Module:
    """The model the checkpoint describes, built on ``device`` (``meta``: shapes only, nothing allocated)."""
    from ..graph.rewrite import apply_edits
    from ..models.registry import model_from_arch

    if "zoo" in base_desc:
        arch = base_desc["zoo"]
        if not isinstance(arch, dict):
            raise CheckpointError(f"checkpoint {path}: architecture metadata is not a dict")
        for k, v in arch.items():
            if isinstance(v, list) and len(v) > n_tensors + 8:
                raise CheckpointError(f"checkpoint {path}: architecture field {k!r} lists {len(v)} entries for "
                                      f"{n_tensors} tensors")
        if sum(v for v in arch.get("blocks", []) if isinstance(v, int)) > n_tensors:
            raise CheckpointError(f"checkpoint {path}: architecture has more blocks than the file has tensors")
        try:
            with torch.device(device):
                model = model_from_arch(arch)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path}: bad architecture {arch!r}: {e}") from None
    elif "sequential" in base_desc:
        from .sequential import sequential_from_spec

        try:
            with torch.device(device):
                model = sequential_from_spec(base_desc)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
    elif "class" in base_desc:
        if base is None and base_desc["class"] == "torch.nn.modules.container.Sequential":
            from .sequential import LAYERS

            raise CheckpointError(f"checkpoint {path} holds an nn.Sequential with layers other than "
                                  f"{', '.join(LAYERS)} (or a nested Sequential of them), so its architecture is "
                                  "not in the file: load it in Python with hetfuse.load_model(path, base=<a fresh "
                                  "instance of that Sequential>)")
        if base is None:
            raise CheckpointError(f"checkpoint {path} holds a {base_desc['class']} (not a hetfuse zoo model): load it "
                                  f"in Python with hetfuse.load_model(path, base=<a fresh instance of that class>)")
        if _class_name(base) != base_desc["class"]:
            raise CheckpointError(f"checkpoint {path} was saved from a {base_desc['class']}, but base is a "
                                  f"{_class_name(base)}")
        model = copy.deepcopy(base).to(device)
    else:
        raise CheckpointError(f"checkpoint {path}: metadata names no base architecture")
    try:
        with torch.device(device):
            model = apply_edits(model, edits)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except (HetfuseError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: its edits do not apply to its base architecture ({e})") from None
    return model


def _compare(model: nn.Module, shapes: dict[str, tuple], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: weights do not match its architecture (missing: "
                              f"{', '.join(missing[:5]) or 'none'}{' ...' if len(missing) > 5 else ''}; unexpected: "
                              f"{', '.join(unexpected[:5]) or 'none'}{' ...' if len(unexpected) > 5 else ''})")
    wrong = [f"{k}: {shapes[k]} vs {v}" for k, v in expected.items() if shapes[k] != v]
    if wrong:
        raise CheckpointError(f"checkpoint {path}: weight shapes do not match its architecture "
                              f"({'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''})")


def _legacy(meta: dict, path: Path) -> tuple[dict, list, dict]:
    """Base and edits of a checkpoint written by hetfuse 0.1 (``arch`` with optional ``added_biases``)."""
    arch = json.loads(meta["arch"])
    if not isinstance(arch, dict):
        raise CheckpointError(f"checkpoint {path}: architecture metadata is not a dict")
    added = arch.pop("added_biases", [])
    edits = []
    if added:
        from ..graph.rewrite import module_spec
        from ..models.registry import model_from_arch

        with torch.device("meta"):
            ref = model_from_arch(arch)
        for name in added:
            mod = ref.get_submodule(str(name).removesuffix(".bias"))
            spec = module_spec(mod)
            spec["args"]["bias"] = True
            edits.append({"op": "replace_module", "target": str(name).removesuffix(".bias"), "module": spec})
    return {"zoo": arch}, edits, meta


def read_header(path: Path) -> tuple[dict, dict[str, tuple]]:
    """The metadata and the tensors' shapes of a safetensors file, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:  # safetensors raises SafetensorError (and sometimes others) on bad files
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (corrupt or truncated): {e}") from None
    return meta, shapes


def load_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False, base: nn.Module | None = None,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint; returns ``(model in eval mode, its metadata dict)``. ``base``: a fresh instance of the
    user's class for checkpoints of non-zoo models."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not _looks_like_safetensors(head, size):
        if _looks_like_pickle(path, head) and not allow_pickle:
            raise _pickle_refusal(path)
        if allow_pickle:
            return _load_pickle(path)
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (corrupt, truncated or another format); "
                              "if it is a torch.save file you trust, pass --allow-pickle (allow_pickle=True)")
    meta, shapes = read_header(path)
    if meta.get("format") == FORMAT and "multihead" in meta:
        return _load_multihead(path, meta, shapes, base, device)
    if meta.get("format") == FORMAT and "multibranch" in meta:
        return _load_multibranch(path, meta, shapes, base, device)
    if meta.get("format") != FORMAT or not ("base" in meta or "arch" in meta):
        raise CheckpointError(f"{path} is a safetensors file without hetfuse metadata (a foreign checkpoint): its "
                              "architecture is unknown, so hetfuse cannot rebuild the model")
    try:
        if "base" in meta:
            base_desc, edits = json.loads(meta["base"]), json.loads(meta.get("edits", "[]") or "[]")
        else:
            base_desc, edits, _ = _legacy(meta, path)
        extra = json.loads(meta.get("extra", "{}") or "{}")
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path}: corrupt metadata ({e})") from None
    if not isinstance(base_desc, dict):
        raise CheckpointError(f"checkpoint {path}: base metadata is not a dict")
    # first the structure alone, on the meta device: nothing is allocated before it matches the tensors
    _compare(_build(base_desc, edits, base, path, len(shapes), "meta"), shapes, path)
    model = _build(base_desc, edits, base, path, len(shapes), device)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (corrupt or truncated): {e}") from None
    _check_finite(state, path, "refusing to load checkpoint")
    ref = model.state_dict()
    model.load_state_dict({k: v.to(dtype=ref[k].dtype, device=ref[k].device) for k, v in state.items()})
    return model.eval(), extra if isinstance(extra, dict) else {"extra": extra}


def _load_multihead(path: Path, meta: dict, shapes: dict, base, device) -> tuple[nn.Module, dict]:
    """A partially zipped network: its trunk and heads, each rebuilt from its own base and edits."""
    from safetensors import safe_open

    from ..multihead import MultiHead

    try:
        parts = json.loads(meta["multihead"])
        extra = json.loads(meta.get("extra", "{}") or "{}")
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: corrupt metadata ({e})") from None
    if not isinstance(parts, list) or len(parts) < 2 or not all(isinstance(p, dict) for p in parts):
        raise CheckpointError(f"checkpoint {path}: a multi-head network needs a trunk and heads")
    bases = list(base) if isinstance(base, (list, tuple)) else [base] * len(parts)
    if len(bases) != len(parts):
        raise CheckpointError(f"checkpoint {path} has {len(parts)} parts (trunk and heads); give one base per part")

    def build(dev):
        built = [_build(p.get("base", {}), p.get("edits", []), b, path, len(shapes), dev)
                 for p, b in zip(parts, bases, strict=False)]
        return MultiHead(built[0], built[1:])

    _compare(build("meta"), shapes, path)
    model = build(device)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    _check_finite(state, path, "refusing to load checkpoint")
    ref = model.state_dict()
    model.load_state_dict({k: v.to(dtype=ref[k].dtype, device=ref[k].device) for k, v in state.items()})
    return model.eval(), extra if isinstance(extra, dict) else {"extra": extra}


def _load_multibranch(path: Path, meta: dict, shapes: dict, base, device) -> tuple[nn.Module, dict]:
    """A network that keeps every model's early units (``preserve_until``): its branches and its tail, each rebuilt
    from its own base and edits, and the junction's buffers."""
    from safetensors import safe_open

    from ..branches import MultiBranch

    try:
        desc = json.loads(meta["multibranch"])
        extra = json.loads(meta.get("extra", "{}") or "{}")
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: corrupt metadata ({e})") from None
    ok = isinstance(desc, dict) and isinstance(desc.get("branches"), list) and isinstance(desc.get("tail"), dict)
    parts = [*desc["branches"], desc["tail"]] if ok else []
    features, axis = (desc.get("features"), desc.get("feature_axis")) if ok else (None, None)
    if not ok or not 2 <= len(parts) - 1 <= len(shapes) or not all(isinstance(p, dict) for p in parts) or \
            isinstance(features, bool) or not isinstance(features, int) or not 0 < features <= 1 << 24 or \
            axis not in (1, -1):
        raise CheckpointError(f"checkpoint {path}: a multi-branch network needs two or more branches, a tail, its "
                              "number of features and their axis")
    bases = list(base) if isinstance(base, (list, tuple)) else [base] * len(parts)
    if len(bases) != len(parts):
        raise CheckpointError(f"checkpoint {path} has {len(parts)} parts (branches and tail); give one base per part")

    def build(dev):
        built = [_build(p.get("base", {}), p.get("edits", []), b, path, len(shapes), dev)
                 for p, b in zip(parts, bases, strict=True)]
        with torch.device(dev):
            return MultiBranch(built[:-1], built[-1], features, axis)

    _compare(build("meta"), shapes, path)
    model = build(device)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    _check_finite(state, path, "refusing to load checkpoint")
    ref = model.state_dict()
    model.load_state_dict({k: v.to(dtype=ref[k].dtype, device=ref[k].device) for k, v in state.items()})
    return model.eval(), extra if isinstance(extra, dict) else {"extra": extra}


def load_model(path: str | os.PathLike, base: nn.Module | None = None, *, allow_pickle: bool = False,
               device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved with :func:`save_model` (in eval mode). ``base``: a fresh instance of the user's class,
    needed only for models that are neither from hetfuse's zoo nor a plain ``nn.Sequential`` of standard torch
    layers (the checkpoint records the class's name)."""
    return load_checkpoint(path, allow_pickle=allow_pickle, base=base, device=device)[0]


def _load_pickle(path: Path) -> tuple[nn.Module, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot load {path} with torch.load: {e}") from None
    if isinstance(obj, nn.Module):
        _check_finite(dict(obj.state_dict()), path, "refusing to load checkpoint")
        return obj.eval(), {}
    if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj:
        from ..models.registry import model_from_arch

        arch = obj["arch"]
        if isinstance(arch, str):
            try:
                arch = json.loads(arch)
            except json.JSONDecodeError:
                raise CheckpointError(f"checkpoint {path}: 'arch' is not valid JSON") from None
        if not isinstance(arch, dict) or not isinstance(obj["state_dict"], dict):
            raise CheckpointError(f"checkpoint {path}: 'arch' must be a dict and 'state_dict' a dict of tensors")
        state = {k: torch.as_tensor(v) for k, v in obj["state_dict"].items()}
        try:
            model = model_from_arch(arch)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path}: bad architecture {arch!r}: {e}") from None
        _compare(model, {k: tuple(v.shape) for k, v in state.items()}, path)
        _check_finite(state, path, "refusing to load checkpoint")
        model.load_state_dict(state)
        extra = obj.get("metadata", obj.get("extra", {}))
        return model.eval(), dict(extra) if isinstance(extra, dict) else {}
    raise CheckpointError(f"{path}: torch.load gave a {type(obj).__name__}; expected an nn.Module or a dict with "
                          "'arch' and 'state_dict'")
