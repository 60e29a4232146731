"""Memory units and the number formats of the report, the check and the terminal.

Memory is in binary units: GiB (2**30 bytes) for figures of a GiB or more, MiB (2**20) below.
A missing figure (None or NaN) prints as ``missing``: an em dash in the report, ``-`` in logs.
"""

from __future__ import annotations

import math

GiB = 2**30
MiB = 2**20
UNIT_NAMES = {GiB: "GiB", MiB: "MiB"}


def is_missing(value: object) -> bool:
    """None or NaN (pandas holds a missing figure as NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def byte_unit(max_bytes: float | None) -> tuple[str, int]:
    """``("GiB", 2**30)`` for figures of a GiB or more, else ``("MiB", 2**20)``."""
    return ("GiB", GiB) if max_bytes is not None and max_bytes >= GiB else ("MiB", MiB)


def in_unit(value: float | None, unit: int, digits: int = 2, missing: str = "—") -> str:
    """``value`` bytes as a number of ``unit`` (GiB or MiB), without the unit: ``1,234.50``."""
    return missing if is_missing(value) else f"{value / unit:,.{digits}f}"


def format_bytes(value: float | None, unit: int | None = None, digits: int = 2, missing: str = "—") -> str:
    """``value`` bytes with its unit, ``1.25 GiB``; the unit is ``byte_unit(value)``'s unless given."""
    if is_missing(value):
        return missing
    unit = unit or byte_unit(value)[1]
    return f"{in_unit(value, unit, digits)} {UNIT_NAMES[unit]}"


def format_seconds(value: float | None, missing: str = "—") -> str:
    """A step time: ``0.412 s``, ``12.3 s``, ``4.1 ms`` (milliseconds below 0.1 s)."""
    if is_missing(value):
        return missing
    return f"{value * 1e3:.3g} ms" if value < 0.1 else f"{value:.3g} s"


def format_count(value: float | None, missing: str = "—") -> str:
    """A rate or a count rounded to a whole number, with thousands separators: ``12,345``."""
    return missing if is_missing(value) else f"{value:,.0f}"
