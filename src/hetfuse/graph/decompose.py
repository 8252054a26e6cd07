"""Torch modules that torch.fx keeps as opaque leaves but whose inside the description must see, traced as the
operations they compute (eval mode): ``nn.MultiheadAttention`` (self-attention: its packed ``in_proj_weight`` read
as three segment projections ``F.linear(x, W[a:b], bias[a:b])``, heads split, ``F.scaled_dot_product_attention``,
``out_proj``), ``nn.TransformerEncoderLayer`` (pre-LN and post-LN, ``batch_first`` or not) and
``nn.TransformerEncoder``. Dropout modules are kept as calls (they are the identity in eval mode); masks and
``need_weights`` are refused: hetfuse follows unmasked self-attention.

Each entry is a function ``(tracer, module, *args, **kwargs)`` that computes the module's output from fx proxies
by calling its submodules (each traced as usual) and torch functions. :func:`hetfuse.graph.trace.trace` uses this
table; the traced graph computes what the module computes (checked by the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError


def _refuse_masks(module: nn.Module, kwargs: dict, names: tuple[str, ...]) -> None:
    for name in names:
        value = kwargs.get(name)
        if value is not None and value is not False:
            raise UnsupportedModelError(f"{type(module).__name__}: '{name}' is not supported (hetfuse follows "
                                        "unmasked self-attention)")


def multihead_attention(tracer, m: nn.MultiheadAttention, query, key=None, value=None, **kwargs):
    if key is not query or value is not query:
        raise UnsupportedModelError("MultiheadAttention: only self-attention (query, key and value the same tensor) "
                                    "is supported")
    _refuse_masks(m, kwargs, ("key_padding_mask", "attn_mask", "is_causal"))
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise UnsupportedModelError("MultiheadAttention with kdim/vdim, bias_k/bias_v or add_zero_attn is not "
                                    "supported")
    path = tracer.path_of_module(m)
    d, h = m.embed_dim, m.num_heads
    weight = tracer.create_proxy("get_attr", f"{path}.in_proj_weight", (), {})
    bias = tracer.create_proxy("get_attr", f"{path}.in_proj_bias", (), {}) if m.in_proj_bias is not None else None
    x = query if m.batch_first else query.transpose(0, 1)  # N x T x D
    n, t = x.shape[0], x.shape[1]
    heads = []
    for k in range(3):
        w = weight[k * d:(k + 1) * d]
        b = bias[k * d:(k + 1) * d] if bias is not None else None
        heads.append(F.linear(x, w, b).view(n, t, h, d // h).transpose(1, 2))
    out = F.scaled_dot_product_attention(*heads)
    out = m.out_proj(out.transpose(1, 2).reshape(n, t, d))
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, None


def transformer_encoder_layer(tracer, m: nn.TransformerEncoderLayer, src, src_mask=None, src_key_padding_mask=None,
                              is_causal=False):
    _refuse_masks(m, {"src_mask": src_mask, "src_key_padding_mask": src_key_padding_mask, "is_causal": is_causal},
                  ("src_mask", "src_key_padding_mask", "is_causal"))

    def sa(x):
        return m.dropout1(m.self_attn(x, x, x, need_weights=False)[0])

    def ff(x):
        return m.dropout2(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    x = src
    if m.norm_first:
        x = x + sa(m.norm1(x))
        return x + ff(m.norm2(x))
    x = m.norm1(x + sa(x))
    return m.norm2(x + ff(x))


def transformer_encoder(tracer, m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None, is_causal=None):
    _refuse_masks(m, {"mask": mask, "src_key_padding_mask": src_key_padding_mask, "is_causal": is_causal},
                  ("mask", "src_key_padding_mask", "is_causal"))
    x = src
    for layer in m.layers:
        x = layer(x)
    return m.norm(x) if m.norm is not None else x


DECOMPOSITIONS: dict[type, Callable] = {
    nn.MultiheadAttention: multihead_attention,
    nn.TransformerEncoderLayer: transformer_encoder_layer,
    nn.TransformerEncoder: transformer_encoder,
}


def decomposition(m: nn.Module) -> Callable | None:
    return DECOMPOSITIONS.get(type(m))


__all__ = ["DECOMPOSITIONS", "decomposition"]
