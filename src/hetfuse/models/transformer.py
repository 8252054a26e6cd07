"""Pre-LN transformer encoders: a Vision Transformer (:class:`ViT`) and a BERT-style text encoder
(:class:`BertEncoder`).

Both are a stack of :class:`TransformerBlock` in ``self.blocks`` (an ``nn.ModuleList``), each pre-LN::

    x = x + attn(norm1(x))
    x = x + mlp(norm2(x))

then a final ``self.norm`` (LayerNorm), pooling (``x[:, 0]``, the first token, for ``pool="cls"``, or
``x.mean(dim=1)`` for ``pool="mean"``) and the classifier ``self.head`` (Linear ``dim -> num_classes``). No
dropout. Because every block only *adds* to the residual stream, a block whose ``attn.proj`` and ``mlp.fc2``
weights and biases are zero is the identity: a depth-``d + 1`` model with one such block computes the same
function as the depth-``d`` model without it (the identity the fusion engine relies on to align depths).

* :class:`Attention`: multi-head self-attention with ``F.scaled_dot_product_attention``; its input projections
  are three Linears ``q``, ``k``, ``v`` (``qkv=3``, Hugging Face style) or one fused ``qkv`` Linear
  ``dim -> 3 * dim`` (``qkv=1``, timm style), then ``proj`` (``dim -> dim``). All Linears have biases.
* :class:`FeedForward`: ``fc1`` (``dim -> mlp``), ``act`` (GELU), ``fc2`` (``mlp -> dim``).
* :class:`ViT`: ``patch`` (Conv2d with kernel = stride = the patch size, ``C -> dim``), flattened to tokens
  ``N x T x dim``; with ``pool="cls"`` a learned ``cls_token`` (``1 x 1 x dim``, zeros) is prepended; learned
  positions ``pos_embed`` (``1 x T x dim``, T counting the class token) are added.
* :class:`BertEncoder`: token ids ``N x seq`` (int64) -> ``embed`` (``nn.Embedding(vocab, dim)``) + learned
  positions ``pos_embed`` (``1 x seq x dim``; inputs must have exactly ``seq`` tokens, the first one is the
  pooled "[CLS]" position with ``pool="cls"``).

Positions are initialised from a truncated normal (std 0.02); every other layer keeps PyTorch's default
initialisation. The forward passes use only operations that ``torch.fx.symbolic_trace`` and ``torch.export``
follow: sizes are read from ``x.shape`` (never converted with ``int()``) and the head size is fixed in
``__init__``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("cls", "mean")
QKV_STYLES = (3, 1)


def _positive(**sizes: int) -> None:
    bad = {k: v for k, v in sizes.items() if not (isinstance(v, int) and v > 0)}
    if bad:
        raise ValueError(f"transformer sizes must be positive integers, got {bad}")


class Attention(nn.Module):
    """Multi-head self-attention on ``N x T x dim``; ``qkv=3``: Linears ``q``, ``k``, ``v``; ``qkv=1``: one
    Linear ``qkv`` (``dim -> 3 * dim``, outputs ordered q, k, v and within each by head). Then ``proj``."""

    def __init__(self, dim: int, heads: int, qkv: int = 3) -> None:
        super().__init__()
        _positive(dim=dim, heads=heads)
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if qkv not in QKV_STYLES:
            raise ValueError(f"qkv must be 3 (separate q, k, v Linears) or 1 (one fused Linear), got {qkv!r}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.fused = qkv == 1
        if self.fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(dim, dim)
            self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[0], x.shape[1]
        if self.fused:
            qkv = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = self.q(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
            k = self.k(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
            v = self.v(x).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, self.dim))


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))``: Linear ``dim -> hidden``, GELU, Linear ``hidden -> dim``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        _positive(dim=dim, mlp=hidden)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp: int, qkv: int = 3) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv=qkv)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Encoder(nn.Module):
    """The shared trunk: ``blocks``, ``norm``, pooling and ``head``."""

    def _settings(self, depth: int, dim: int, heads: int, mlp: int, pool: str, qkv: int, num_classes: int) -> None:
        _positive(depth=depth, dim=dim, heads=heads, mlp=mlp, num_classes=num_classes)
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if qkv not in QKV_STYLES:
            raise ValueError(f"qkv must be 3 (separate q, k, v Linears) or 1 (one fused Linear), got {qkv!r}")
        self.depth, self.dim, self.heads, self.mlp_dim = depth, dim, heads, mlp
        self.pool, self.qkv_style, self.num_classes = pool, qkv, num_classes

    def _build_trunk(self) -> None:
        """``blocks``, ``norm`` and ``head``, registered after the embedding (the state dict's order)."""
        self.blocks = nn.ModuleList(TransformerBlock(self.dim, self.heads, self.mlp_dim, qkv=self.qkv_style)
                                    for _ in range(self.depth))
        self.norm = nn.LayerNorm(self.dim)
        self.head = nn.Linear(self.dim, self.num_classes)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:  # a fixed ModuleList: traces to a straight chain
            x = block(x)
        x = self.norm(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(x)

    def extra_repr(self) -> str:
        return f"arch={self.arch()}"


class ViT(_Encoder):
    """Vision Transformer for ``N x C x H x W`` images; see the module docstring for the layout."""

    def __init__(self, depth: int = 4, dim: int = 64, heads: int = 4, patch: int = 4, mlp: int | None = None,
                 pool: str = "cls", qkv: int = 3, num_classes: int = 10, in_channels: int = 3,
                 image_size: Sequence[int] = (32, 32)) -> None:
        super().__init__()
        mlp = 4 * dim if mlp is None else mlp
        image_size = tuple(image_size)
        if len(image_size) != 2:
            raise ValueError(f"ViT image_size must be (H, W), got {image_size!r}")
        _positive(patch=patch, in_channels=in_channels, height=image_size[0], width=image_size[1])
        if image_size[0] % patch or image_size[1] % patch:
            raise ValueError(f"ViT image size {image_size[0]}x{image_size[1]} is not divisible by the patch size "
                             f"{patch}")
        self._settings(depth, dim, heads, mlp, pool, qkv, num_classes)
        self.patch_size, self.in_channels, self.image_size = patch, in_channels, image_size
        self.patch = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        tokens = (image_size[0] // patch) * (image_size[1] // patch) + (1 if pool == "cls" else 0)
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self._build_trunk()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        return self._trunk(x)

    def arch(self) -> dict:
        """JSON-serialisable architecture, stored in checkpoint metadata."""
        return {"type": "vit", "depth": self.depth, "dim": self.dim, "heads": self.heads, "patch": self.patch_size,
                "mlp": self.mlp_dim, "pool": self.pool, "qkv": self.qkv_style, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "image_size": list(self.image_size)}

    @classmethod
    def from_arch(cls, arch: dict) -> ViT:
        if arch.get("type") != "vit":
            raise ValueError(f"not a ViT architecture: {arch!r}")
        return cls(depth=int(arch["depth"]), dim=int(arch["dim"]), heads=int(arch["heads"]),
                   patch=int(arch["patch"]), mlp=int(arch["mlp"]), pool=str(arch.get("pool", "cls")),
                   qkv=int(arch.get("qkv", 3)), num_classes=int(arch.get("num_classes", 10)),
                   in_channels=int(arch.get("in_channels", 3)),
                   image_size=[int(s) for s in arch.get("image_size", (32, 32))])


class BertEncoder(_Encoder):
    """BERT-style pre-LN text encoder for token ids ``N x seq``; see the module docstring for the layout."""

    def __init__(self, depth: int = 2, dim: int = 64, heads: int = 4, vocab: int = 1000, seq: int = 32,
                 mlp: int | None = None, pool: str = "cls", num_classes: int = 10) -> None:
        super().__init__()
        mlp = 4 * dim if mlp is None else mlp
        _positive(vocab=vocab, seq=seq)
        self._settings(depth, dim, heads, mlp, pool, 3, num_classes)
        self.vocab, self.seq = vocab, seq
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self._build_trunk()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._trunk(self.embed(tokens) + self.pos_embed)

    def arch(self) -> dict:
        """JSON-serialisable architecture, stored in checkpoint metadata."""
        return {"type": "bert", "depth": self.depth, "dim": self.dim, "heads": self.heads, "vocab": self.vocab,
                "seq": self.seq, "mlp": self.mlp_dim, "pool": self.pool, "num_classes": self.num_classes}

    @classmethod
    def from_arch(cls, arch: dict) -> BertEncoder:
        if arch.get("type") != "bert":
            raise ValueError(f"not a BERT encoder architecture: {arch!r}")
        return cls(depth=int(arch["depth"]), dim=int(arch["dim"]), heads=int(arch["heads"]),
                   vocab=int(arch["vocab"]), seq=int(arch["seq"]), mlp=int(arch["mlp"]),
                   pool=str(arch.get("pool", "cls")), num_classes=int(arch.get("num_classes", 10)))
