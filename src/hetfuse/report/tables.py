"""Small helpers for the markdown tables of results and summaries."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_ms(values: Sequence[float]) -> str:
    """``mean ± std`` with two decimals (``n/a`` for no values)."""
    m, s = mean_std(values)
    return "n/a" if math.isnan(m) else f"{m:.2f} ± {s:.2f}"


def fmt(v, digits: int = 2) -> str:
    """A number with ``digits`` decimals; anything else as text (``n/a`` for None or an empty string)."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}"
    return "n/a" if v in (None, "") else str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def format_alignment(alignment) -> str:
    """A 0-based alignment (deep position of each shallow unit) as ``1→1, 2→3, 3→4``: shallow unit → deep unit,
    both 1-based."""
    return ", ".join(f"{j + 1}→{int(a) + 1}" for j, a in enumerate(alignment))


def describe_alignment(mapping: dict) -> str:
    """One model's entry of ``report["mappings"]`` in words, the arrow always shallow → deep (1-based)."""
    ref = ", ".join(f"model {r}" for r in mapping["reference"]) or "itself"
    if mapping["role"] == "deep":  # merge: the reference's units are placed among this model's
        return f"{ref} → model {mapping['model']}: {format_alignment(mapping['alignment'])}"
    return f"model {mapping['model']} → {ref}: {format_alignment(mapping['alignment'])}"
