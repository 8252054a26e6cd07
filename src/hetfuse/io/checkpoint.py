"""Checkpoints: safetensors files with the architecture in their metadata (no pickle unless asked)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..errors import CheckpointError
from ..models.registry import arch_with_added_biases, model_from_arch

FORMAT = "hetfuse"
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"}
_ZIP_MAGIC = b"PK\x03\x04"


def _check_finite(tensors: dict[str, torch.Tensor], path: Path | str, action: str) -> None:
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{action} {path}: parameter(s) {', '.join(bad)} contain NaN or Inf")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None,
                    force: bool = False) -> Path:
    """Write ``model`` to ``path`` as a safetensors file (atomically); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not force:
        raise CheckpointError(f"refusing to overwrite existing checkpoint {path} (pass --force to replace it)")
    if path.exists() and path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    if not hasattr(model, "arch"):
        raise CheckpointError(f"cannot save {type(model).__name__} to {path}: the model has no arch() description")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    _check_finite(tensors, path, "refusing to save checkpoint")
    try:
        meta = {"format": FORMAT, "hetfuse_version": __version__, "arch": json.dumps(arch_with_added_biases(model)),
                "extra": json.dumps(metadata if metadata is not None else {})}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save checkpoint {path}: metadata is not JSON-serialisable ({e})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise CheckpointError(f"failed to write checkpoint {path}: {e}") from e
        raise
    return path


def _looks_like_pickle(path: Path, head: bytes) -> bool:
    return head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80" or path.suffix.lower() in PICKLE_SUFFIXES


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a safetensors checkpoint (it looks like a pickle / torch.save file). Loading pickle "
        "files can run arbitrary code; if you trust this file, pass --allow-pickle (allow_pickle=True)"
    )


def _model_from_state(arch: dict, state: dict, path: Path) -> nn.Module:
    try:
        model = model_from_arch(arch)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: bad architecture {arch!r}: {e}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: weights do not match its architecture (missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'})"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"checkpoint {path}: weight shapes do not match its architecture ({'; '.join(wrong)})")
    _check_finite(state, path, "refusing to load checkpoint")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()


def _load_pickle(path: Path) -> tuple[nn.Module, dict]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot load {path} with torch.load: {e}") from None
    if isinstance(obj, nn.Module):
        _check_finite(dict(obj.state_dict()), path, "refusing to load checkpoint")
        return obj.eval(), {}
    if isinstance(obj, dict) and "arch" in obj and "state_dict" in obj:
        arch = obj["arch"]
        if isinstance(arch, str):
            try:
                arch = json.loads(arch)
            except json.JSONDecodeError:
                raise CheckpointError(f"checkpoint {path}: 'arch' is not valid JSON") from None
        if not isinstance(arch, dict) or not isinstance(obj["state_dict"], dict):
            raise CheckpointError(f"checkpoint {path}: 'arch' must be a dict and 'state_dict' a dict of tensors")
        state = {k: torch.as_tensor(v) for k, v in obj["state_dict"].items()}
        extra = obj.get("metadata", obj.get("extra", {}))
        return _model_from_state(arch, state, path), dict(extra) if isinstance(extra, dict) else {}
    raise CheckpointError(
        f"{path}: torch.load gave a {type(obj).__name__}; expected an nn.Module or a dict with 'arch' and 'state_dict'"
    )


def load_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[nn.Module, dict]:
    """Load a checkpoint; returns ``(model in eval mode, extra metadata dict)``."""
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
        if _looks_like_pickle(path, head):
            if not allow_pickle:
                raise _pickle_refusal(path)
            return _load_pickle(path)
        if allow_pickle:
            return _load_pickle(path)
        raise CheckpointError(
            f"{path} is not a valid safetensors checkpoint (corrupt, truncated or another format); "
            "if it is a torch.save file you trust, pass --allow-pickle"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError (and sometimes others) on bad files
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint (corrupt or truncated): {e}") from None
    if meta.get("format") != FORMAT or "arch" not in meta:
        raise CheckpointError(
            f"{path} is a safetensors file without hetfuse metadata (a foreign checkpoint): its architecture is "
            "unknown, so hetfuse cannot rebuild the model"
        )
    try:
        arch = json.loads(meta["arch"])
        extra = json.loads(meta.get("extra", "{}") or "{}")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: corrupt metadata ({e})") from None
    if not isinstance(arch, dict):
        raise CheckpointError(f"checkpoint {path}: architecture metadata is not a dict")
    return _model_from_state(arch, state, path), extra if isinstance(extra, dict) else {"extra": extra}
