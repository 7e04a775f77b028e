"""Value ranges of numeric config fields, declared beside each field and checked by `load_config`:

    batch_size: int = field(default=32, metadata=ok(">= 1"))
    fraction: float = field(default=1.0, metadata=ok("in (0, 1]"))

A value outside its range is a `ConfigError` naming the key and the allowed range (None passes:
Optional fields mean "unset")."""
from __future__ import annotations

import re
from typing import Any

_CMP = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^in\s*([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$")


def ok(rule: str) -> dict:
    """Field metadata declaring the allowed values: ">= 1", "> 0", "in [0, 1)", "in (0, 1]"."""
    if not (_CMP.match(rule) or _INTERVAL.match(rule)):
        raise ValueError(f"bad range rule {rule!r}")
    return {"range": rule}


def in_range(value: Any, rule: str) -> bool:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    m = _CMP.match(rule)
    if m:
        op, bound = m.group(1), float(m.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    m = _INTERVAL.match(rule)
    lo_b, lo, hi, hi_b = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
    return (value >= lo if lo_b == "[" else value > lo) and (value <= hi if hi_b == "]" else value < hi)
