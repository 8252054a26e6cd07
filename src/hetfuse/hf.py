"""Hugging Face models in the pipeline (the optional ``hf`` extra: ``pip install "hetfuse[hf]"``).

A ``transformers`` model returns an output object; hetfuse reads and fuses functions of one tensor. A model whose
output has ``logits`` (``BertForSequenceClassification``, ``ViTForImageClassification``, …) is wrapped in
:class:`Logits` on the way in and unwrapped on the way out, so the fused model is the user's class where the
depths allow (at equal depths; across depths the fused network is the balanced ``torch.fx.GraphModule`` of the
wrapper). Hugging Face code cannot be traced by ``torch.fx``: the description uses ``torch.export``
(:mod:`hetfuse.graph.export_trace`). Nothing here imports ``transformers``.
"""

from __future__ import annotations

from torch import nn


class Logits(nn.Module):
    """``model(x).logits`` as a module (``model`` is its only child, so its state-dict keys are ``model.…``)."""

    def __init__(self, model: nn.Module, *, auto: bool = False) -> None:
        super().__init__()
        self.model = model
        self.auto = auto  # made by wrap(): the fusion hands back the model inside
        self.train(model.training)

    def forward(self, x):
        return self.model(x).logits


def is_hf_classifier(model: nn.Module) -> bool:
    """A ``transformers`` model (its class comes from the ``transformers`` package) with a classification head."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config") and \
        type(model).__name__.endswith(("ForSequenceClassification", "ForImageClassification",
                                       "ForTokenClassification"))


def wrap(model: nn.Module) -> nn.Module:
    return Logits(model, auto=True) if is_hf_classifier(model) else model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a wrapper :func:`wrap` made (a user's own :class:`Logits` stays as it is)."""
    return model.model if isinstance(model, Logits) and model.auto else model
