"""hetfuse: fuse trained neural networks of different depths and widths without retraining."""

from .align.cla import cross_layer_alignment
from .config import FusionConfig
from .fuse import FusionResult, PreparedFusion, fuse, prepare_fusion

__version__ = "0.1.0"

__all__ = ["FusionConfig", "FusionResult", "PreparedFusion", "cross_layer_alignment", "fuse", "prepare_fusion",
           "__version__"]
