"""Pooling steer-bench runs: exact sums of hits and judge NLL, and one line for runs that do not pool."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import saealign.cli.app as cli
from saealign.errors import SaealignError
from saealign.evaluate.steer_bench import Cell, summarise
from saealign.evaluate.steer_bench_pool import join_runs, pool_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = {"method": "add", "strength": 0.15}


def cell(condition: str, topic: str, per_seed: list[float], nll: float, tokens: int, d2: float) -> dict[str, Any]:
    return {"condition": condition, "topic": topic, "group": "g", "hit_rate": sum(per_seed) / len(per_seed),
            "hit_rate_per_seed": per_seed, "nll": nll, "tokens": tokens, "distinct2": d2, "distance": 0.5,
            "strength": 0.15, "samples": []}


def run(seeds: list[int], scale: float) -> dict[str, Any]:
    """A run of 4 openers x ``seeds`` on topics a, b with rows none and add; ``scale`` varies its figures."""
    k = len(seeds)
    cells = [cell("none", "a", [0.25] * k, 200.0 * k, 100 * k, 0.9),
             cell("none", "b", [0.0] * k, 210.0 * k, 100 * k, 0.8),
             cell("add", "a", [0.75, *[0.5] * (k - 1)], 260.0 * k * scale, 96 * k, 0.8 * scale),
             cell("add", "b", [1.0] * k, 230.0 * k, 90 * k, 0.7)]
    return {"cells": cells, "config": {"n_openers": 4, "seeds": seeds, "max_new_tokens": 48, "top_k": 5},
            "conditions": [{"label": "none", "spec": {"method": "none"}}, {"label": "add", "spec": SPEC}]}


def test_one_run_pools_to_its_own_summary() -> None:
    one = run([0, 1], 1.0)
    pooled = pool_runs([one])
    rows = summarise([Cell(**c) for c in one["cells"]], ["none", "add"])
    for mine, theirs in zip(pooled["rows"], rows, strict=True):
        assert mine["hit_rate"] == theirs["hit_rate"] and mine["ppl_ratio"] == theirs["ppl_ratio"]
        assert mine["distinct2_ratio_weighted"] == theirs["distinct2_ratio"]
        assert mine["hit_rate_std"] == theirs["hit_rate_seed_std"]


def test_two_runs_sum_hits_and_nll() -> None:
    first, second = run([0, 1], 1.0), run([2, 3, 4], 1.2)
    pooled = pool_runs([first, second])
    add = next(r for r in pooled["rows"] if r["condition"] == "add")
    # topic a: 8 + 12 continuations; hits 0.625 x 8 = 5 and (0.75 + 0.5 + 0.5) / 3 x 12 = 7
    a = next(c for c in pooled["cells"] if c["condition"] == "add" and c["topic"] == "a")
    assert (a["hits"], a["continuations"]) == (12, 20) and a["hit_rate"] == pytest.approx(12 / 20)
    assert add["hits"] == 12 + 20 and add["continuations"] == 40
    ppl_a = math.exp((520 + 260 * 3 * 1.2) / (192 + 288)) / math.exp(1000 / 500)
    ppl_b = math.exp(1150 / 450) / math.exp(1050 / 500)
    assert add["ppl_ratio"] == pytest.approx(math.sqrt(ppl_a * ppl_b), rel=1e-12)
    d2_a = (8 * 0.8 / 0.9 + 12 * 0.96 / 0.9) / 20
    assert add["distinct2_ratio_weighted"] == pytest.approx((d2_a + 0.7 / 0.8) / 2, rel=1e-12)
    assert len(a["hit_rate_per_seed"]) == 5 and pooled["seeds"] == [0, 1, 2, 3, 4]


def test_rows_missing_from_a_run_are_left_out() -> None:
    first, second = run([0], 1.0), run([1], 1.0)
    second["conditions"].append({"label": "prompting", "spec": {"method": "none"}})
    pooled = pool_runs([first, second])
    assert [r["condition"] for r in pooled["rows"]] == ["none", "add"] and pooled["left_out"] == ["prompting"]


@pytest.mark.parametrize(("change", "needle"), [
    (lambda r: r["config"].update(seeds=[1, 5]), "appear in more than one run"),
    (lambda r: r["config"].update(n_openers=16), "differ in n_openers"),
    (lambda r: r["conditions"][1].update(spec={"method": "add", "strength": 0.16}), "different settings"),
    (lambda r: [c.update(topic="z") for c in r["cells"] if c["topic"] == "b"], "different topics"),
])
def test_unlike_runs_do_not_pool(change: Any, needle: str) -> None:
    other = run([5, 6], 1.0)
    change(other)
    with pytest.raises(SaealignError, match=needle):
        pool_runs([run([0, 1], 1.0), other])


def test_pooling_needs_the_unsteered_row() -> None:
    lone = run([0], 1.0)
    lone["conditions"] = lone["conditions"][1:]
    with pytest.raises(SaealignError, match="unsteered row"):
        pool_runs([lone])


def test_cli_writes_the_pooled_tables_and_frontier(tmp_path: Path) -> None:
    for name, seeds in (("r1", [0, 1]), ("r2", [2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "steer_bench.json").write_text(json.dumps(run(seeds, 1.0)))
    out = tmp_path / "pooled"
    result = CliRunner().invoke(cli.main, ["eval", "steer-bench-pool", str(tmp_path / "r1"),
                                           str(tmp_path / "r2" / "steer_bench.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "steer_bench_pooled.json").read_text())
    assert [r["continuations"] for r in saved["summary"]] == [24, 24] and saved["seeds"] == [0, 1, 2]
    assert (out / "steer_bench_frontier.png").read_bytes()[:8] == PNG_MAGIC
    assert "| topic | none | add |" in (out / "steer_bench_pooled.md").read_text()


def test_cli_bad_run_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "steer_bench.json"
    broken.write_text("{not json")
    bad = copy.deepcopy(run([0], 1.0))
    del bad["cells"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    for path, needle in ((broken, "is not a steer-bench JSON"), (tmp_path / "bad.json", "lacks cells"),
                         (tmp_path / "absent", "no such file")):
        result = CliRunner().invoke(cli.main, ["eval", "steer-bench-pool", str(path), "--out", str(tmp_path / "o")])
        lines = [x for x in result.output.strip().splitlines() if x.strip()]
        assert result.exit_code != 0 and len(lines) == 1 and needle in lines[0], result.output


def _split(whole: dict[str, Any], rows: list[str]) -> dict[str, Any]:
    """The part of ``whole`` holding ``rows``: a run of the same seeds that measured only those."""
    return {"cells": [c for c in whole["cells"] if c["condition"] in rows], "config": whole["config"],
            "conditions": [c for c in whole["conditions"] if c["label"] in rows]}


def test_runs_on_the_same_seeds_join_to_the_run_that_held_every_row() -> None:
    whole = run([0, 1], 1.0)
    whole["conditions"].append({"label": "add 2", "spec": {"method": "add", "strength": 2.0}})
    whole["cells"] += [cell("add 2", t, [1.0, 1.0], 300.0, 90, 0.5) for t in ("a", "b")]
    joined = join_runs([_split(whole, ["none", "add"]), _split(whole, ["none", "add 2"])])
    assert [c["label"] for c in joined["conditions"]] == ["none", "add", "add 2"]
    assert pool_runs([joined])["rows"] == pool_runs([whole])["rows"]


def test_runs_that_did_not_measure_the_same_thing_do_not_join() -> None:
    first, second = run([0, 1], 1.0), run([0, 1], 1.0)
    second["cells"][0]["nll"] += 1.0  # the shared unsteered row differs: another measurement
    with pytest.raises(SaealignError, match="'none' on 'a' differs between the runs"):
        join_runs([first, second])
    with pytest.raises(SaealignError, match="differ in seeds"):
        join_runs([run([0, 1], 1.0), run([0, 2], 1.0)])
    other = run([0, 1], 1.0)
    other["conditions"][1]["spec"] = {"method": "add", "strength": 0.3}
    with pytest.raises(SaealignError, match="steer 'add' with different settings"):
        join_runs([run([0, 1], 1.0), other])


def test_cli_join_writes_the_rows_side_by_side(tmp_path: Path) -> None:
    whole = run([4], 1.0)
    for name, rows in (("r1", ["none"]), ("r2", ["none", "add"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "steer_bench.json").write_text(json.dumps(_split(whole, rows)))
    out = tmp_path / "joined"
    args = ["eval", "steer-bench-pool", "--join", str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(out)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "steer_bench_pooled.json").read_text())
    assert [r["condition"] for r in saved["summary"]] == ["none", "add"] and saved["seeds"] == [4]
    refused = CliRunner().invoke(cli.main, ["eval", "steer-bench-pool", str(tmp_path / "r1"), str(tmp_path / "r2"),
                                            "--out", str(out)])  # without --join: seed 4 would count twice
    assert refused.exit_code != 0 and "appear in more than one run" in refused.output


def test_pooled_cells_keep_every_continuation_and_the_rows_get_an_interval() -> None:
    first, second = run([0, 1], 1.0), run([2], 1.0)
    for r in (first, second):
        n = 4 * len(r["config"]["seeds"])
        for c in r["cells"]:  # per-continuation NLLs that sum to the cell's
            c["nll_per_text"] = [c["nll"] / n + 0.1 * (i % 3 - 1) for i in range(n)]
            c["tokens_per_text"] = [c["tokens"] // n] * n
    pooled = pool_runs([first, second])
    cell = next(c for c in pooled["cells"] if c["condition"] == "add" and c["topic"] == "a")
    assert cell["nll_per_text"] == first["cells"][2]["nll_per_text"] + second["cells"][2]["nll_per_text"]
    add = next(r for r in pooled["rows"] if r["condition"] == "add")
    assert add["ppl_ratio_low"] <= add["ppl_ratio_high"]
    assert "ppl_ratio_low" not in pool_runs([run([0], 1.0)])["rows"][1]  # runs without them: no interval


def test_an_unsteered_row_on_more_seeds_pools_by_its_own_continuations() -> None:
    first, second = run([0, 1], 1.0), run([2], 1.0)
    first["config"]["unsteered_seeds"] = [0, 1, 5, 6]
    for c in first["cells"]:
        if c["condition"] == "none":  # four seeds: twice the continuations, the same per-token figures
            c.update(hit_rate_per_seed=c["hit_rate_per_seed"] * 2, nll=c["nll"] * 2, tokens=c["tokens"] * 2)
    pooled = pool_runs([first, second])
    none_a = next(c for c in pooled["cells"] if c["condition"] == "none" and c["topic"] == "a")
    assert none_a["continuations"] == 4 * 4 + 4 * 1 and none_a["hits"] == 5
    add_a = next(c for c in pooled["cells"] if c["condition"] == "add" and c["topic"] == "a")
    assert add_a["continuations"] == 4 * 2 + 4 * 1
    clash = run([3], 1.0)
    clash["config"]["unsteered_seeds"] = [5]  # seed 5 of the unsteered row is in the first run too
    with pytest.raises(SaealignError, match=r"seed\(s\) \[5\]"):
        pool_runs([first, clash])
    other = copy.deepcopy(first)
    other["config"]["unsteered_seeds"] = [0, 1]
    with pytest.raises(SaealignError, match="differ in unsteered_seeds"):
        join_runs([first, other])


def test_a_row_saved_before_a_setting_existed_pools_with_the_same_row_saved_after() -> None:
    old, new = run([0, 1], 1.0), run([2], 1.0)
    old["conditions"][1]["spec"] = {"method": "add", "strength": 0.15}
    new["conditions"][1]["spec"] = {"method": "add", "strength": 0.15, "tune_steps": 0}  # the field's default
    assert [r["condition"] for r in pool_runs([old, new])["rows"]] == ["none", "add"]
    tuned = copy.deepcopy(new)
    tuned["conditions"][1]["spec"]["tune_steps"] = 12
    with pytest.raises(SaealignError, match="different settings"):
        pool_runs([old, tuned])
