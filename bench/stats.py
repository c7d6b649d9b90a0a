"""Pure arithmetic of the suite: percentiles and ratios (no I/O, unit-tested)."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Table cell of a figure that was not measured (an en dash).
MISSING = "\u2013"
#: The multiplication sign that follows a ratio.
TIMES = "\u00d7"
#: A side whose CPUs were this busy was the limit of a measure (a generator this busy
#: while the target was not: the figure is a bound on what the target can do).
BUSY = 0.85


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) of ``values``, interpolating between neighbours.

    This is the "linear" method (type 7 of Hyndman and Fan, numpy's default): the
    quantile sits at position ``fraction * (n - 1)`` of the sorted values.  Raises
    :class:`ValueError` for an empty sequence or a fraction outside 0..1.
    """
    if not values:
        raise ValueError("no values")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is not within 0..1")
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    below = math.floor(position)
    above = math.ceil(position)
    weight = position - below
    return ordered[below] + (ordered[above] - ordered[below]) * weight


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or ``None`` when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def format_ratio(value: float | None) -> str:
    """A ratio as ``1.23`` and :data:`TIMES` (three significant digits), or :data:`MISSING`."""
    if value is None:
        return MISSING
    return f"{format_number(value)}{TIMES}"


def format_number(value: float | None) -> str:
    """A table cell: three significant digits, no exponent; :data:`MISSING` if missing.

    Integers of four digits and more keep all of them (``12345``), smaller numbers get
    three significant digits (``1.23``, ``0.0456``, ``123``).
    """
    if value is None:
        return MISSING
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 3:
        return f"{value:.0f}"
    decimals = max(0, 2 - magnitude)
    return f"{value:.{decimals}f}"


def mib(value: float) -> float:
    """Bytes to MiB."""
    return value / (1024 * 1024)
