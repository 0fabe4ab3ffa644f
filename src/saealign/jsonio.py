"""Standard JSON out of numbers that may be NaN or infinite.

``json.dumps`` writes NaN and infinities as ``NaN``/``Infinity``, which no standard JSON parser (a browser's,
``jq``, most languages') accepts. Every JSON that saealign prints, writes or streams goes through
:func:`standard`, which turns them into ``null``.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any


def clean(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (numpy scalars become Python numbers)."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, numbers.Integral):  # numpy integers too
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def standard(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`clean` ``(obj)``, refusing anything that would still be non-standard."""
    return json.dumps(clean(obj), allow_nan=False, **kwargs)
