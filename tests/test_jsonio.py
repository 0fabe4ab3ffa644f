"""Every JSON saealign writes is standard: NaN and infinities become null (reports, CLI lines, server events)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from saealign.evaluate.report import write_rows
from saealign.jsonio import clean, standard
from saealign.serve.routes import sse


def strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_standard_by_hand() -> None:
    obj = {"a": float("nan"), "b": [1, np.float32(np.inf), -math.inf], "c": np.int64(3), "d": (True, None, "x")}
    assert standard(obj) == '{"a": null, "b": [1, null, null], "c": 3, "d": [true, null, "x"]}'
    assert clean(np.float64(0.5)) == 0.5 and type(clean(np.float64(0.5))) is float


def test_reports_and_server_events_are_standard(tmp_path: Path) -> None:
    write_rows(tmp_path, "t", [{"x": float("nan"), "y": 1.0}], {"extra": float("inf")})
    assert strict((tmp_path / "t.json").read_text()) == {"rows": [{"x": None, "y": 1.0}], "extra": None}
    event = sse({"contamination": float("nan")}, "token")
    assert strict(event.split("data: ", 1)[1]) == {"contamination": None}


def test_a_type_json_cannot_write_is_still_refused() -> None:
    with pytest.raises(TypeError):
        standard({"x": object()})
