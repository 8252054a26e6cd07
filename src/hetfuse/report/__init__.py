"""Figures and tables: depth-alignment matrices, markdown tables (HTML reports come later)."""

from .figures import plot_alignment_matrices, plot_barrier, plot_matrix, plot_weight_sweep
from .tables import describe_alignment, fmt, fmt_ms, format_alignment, markdown_table, mean_std

__all__ = ["describe_alignment", "fmt", "fmt_ms", "format_alignment", "markdown_table", "mean_std",
           "plot_alignment_matrices", "plot_barrier", "plot_matrix", "plot_weight_sweep"]
