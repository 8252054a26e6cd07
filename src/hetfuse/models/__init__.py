"""Model zoo: MLP, CIFAR VGG-11/13/16/19, CIFAR ResNets, pre-LN transformer encoders (ViT, BERT-style text
encoder) (see :mod:`hetfuse.models.registry`)."""

from .mlp import MLP
from .registry import ZOO, build_model, list_archs, model_from_arch, parse_arch
from .resnet import BasicBlock, ResNet, resnet18, resnet20, resnet26, resnet32, resnet34, resnet50
from .transformer import Attention, BertEncoder, FeedForward, TransformerBlock, ViT
from .vgg import VGG


def has_batchnorm(model) -> bool:
    """Whether ``model`` has a BatchNorm layer (the one definition hetfuse uses)."""
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


__all__ = ["MLP", "VGG", "ResNet", "BasicBlock", "ViT", "BertEncoder", "TransformerBlock", "Attention", "FeedForward",
           "ZOO", "build_model", "has_batchnorm", "list_archs", "model_from_arch", "parse_arch", "resnet18", "resnet20",
           "resnet26", "resnet32", "resnet34", "resnet50"]
