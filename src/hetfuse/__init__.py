"""hetfuse: fuse trained neural networks of different depths and widths without retraining."""

__version__ = "0.1.0"
