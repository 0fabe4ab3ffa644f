"""Pooling runs of the steering benchmark on disjoint seeds into one bigger measurement.

One 4-seed run of ``saealign eval steer-bench`` reads a strength's judge perplexity to ± 0.04x, as much as the
margin to the bound the default is held to. More seeds give a tighter figure, and the seeds can come from several
runs, as long as they measured the same thing: the same topics, openers, tokens and sampling, and each row steered
with the same settings. Pooling then adds what a single run on all the seeds would have counted:

- the hits and continuations of each (row, topic) cell, so a pooled hit rate is hits / continuations;
- the judge's summed NLL and token count of each cell, so a pooled perplexity is exp(Σ NLL / Σ tokens), over the
  pooled unsteered row's, per topic, geometric mean over topics, as :func:`saealign.evaluate.steer_bench.summarise`;
- each seed's hit rate, for the spread over seeds.

Distinct-2 does not pool: it counts distinct bigrams over all of a cell's continuations together, so it falls as a
cell grows. The pooled figure is each run's distinct-2 ratio to its own unsteered row, averaged with the runs'
continuations as weights (the ratio a run of the runs' size reads), and is labelled so.

Runs on the *same* seeds join instead (:func:`join_runs`): their rows are put side by side, as if one run had held
them all, after checking that every row two runs share is the same measurement cell for cell.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from saealign.errors import SaealignError
from saealign.evaluate.ppl_interval import ppl_interval_columns
from saealign.steering.spec import GenerationSpec

MATCHED_CONFIG = ("n_openers", "max_new_tokens", "top_k")
"""What every pooled run must share (the seeds must differ instead)."""


def read_run(path: Path) -> dict[str, Any]:
    """A run's ``steer_bench.json`` (or the folder holding it), checked for what pooling reads; one error line."""
    file = path / "steer_bench.json" if path.is_dir() else path
    try:
        run = json.loads(file.read_text())
    except FileNotFoundError:
        raise SaealignError(f"{file}: no such file (give a steer-bench output folder or its steer_bench.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SaealignError(f"{file} is not a steer-bench JSON ({e})") from None
    if not isinstance(run, dict) or not all(k in run for k in ("cells", "config", "conditions")):
        raise SaealignError(f"{file} is not a steer-bench JSON: it lacks cells, config or conditions")
    return run


def pool_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"rows": [...], "cells": [...], "seeds": [...], "left_out": [...]}`` of the rows every run holds, pooled.

    Rows are matched by label and must carry the same settings in every run; seeds must not repeat between runs
    (a seed read twice would count twice); openers, tokens and sampling must agree."""
    if not runs:
        raise SaealignError("nothing to pool: give at least one steer-bench run")
    seeds = [int(s) for run in runs for s in run["config"]["seeds"]]
    unsteered = [int(s) for run in runs for s in _unsteered_seeds(run)]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1} | {s for s in unsteered if unsteered.count(s) > 1})
    if repeated:
        raise SaealignError(f"seed(s) {repeated} appear in more than one run: pooling would count them twice")
    for key in MATCHED_CONFIG:
        values = {run["config"].get(key) for run in runs}
        if len(values) > 1:
            raise SaealignError(f"the runs differ in {key} ({sorted(values, key=str)}): only like runs pool")
    specs = [{c["label"]: _settings(c) for c in run["conditions"]} for run in runs]
    labels = [label for label in specs[0] if all(label in s for s in specs)]
    for label in labels:
        if any(s[label] != specs[0][label] for s in specs[1:]):
            raise SaealignError(f"the runs steer {label!r} with different settings: only like rows pool")
    if "none" not in labels:
        raise SaealignError("every run needs the unsteered row ('none'): perplexity and distinct-2 are read against it")
    topic_sets = {frozenset(c["topic"] for c in run["cells"]) for run in runs}
    if len(topic_sets) > 1:
        raise SaealignError("the runs cover different topics: only like runs pool")
    left_out = sorted({label for s in specs for label in s} - set(labels))
    cells = [_pool_cell(runs, label, topic) for label in labels
             for topic in dict.fromkeys(c["topic"] for c in runs[0]["cells"] if c["condition"] == label)]
    return {"rows": _summary(cells, labels, int(runs[0]["config"]["n_openers"])), "cells": cells, "seeds": seeds, "left_out": left_out}


def join_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run holding the rows of ``runs``, which were made on the same seeds, openers, tokens and topics; a row
    that several runs hold must match cell for cell (hits per seed, judge NLL and tokens), or one error line says
    the runs did not measure the same thing."""
    if not runs:
        raise SaealignError("nothing to join: give at least one steer-bench run")
    for key in (*MATCHED_CONFIG, "seeds", "unsteered_seeds"):
        values = {json.dumps(_unsteered_seeds(run) if key == "unsteered_seeds" else run["config"].get(key))
                  for run in runs}
        if len(values) > 1:
            raise SaealignError(f"the runs differ in {key} ({', '.join(sorted(values))}): only runs on the same seeds "
                                "join (pool runs on different seeds instead)")
    if len({frozenset(c["topic"] for c in run["cells"]) for run in runs}) > 1:
        raise SaealignError("the runs cover different topics: only like runs join")
    conditions: dict[str, dict[str, Any]] = {}
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        for cond in map(_settings, run["conditions"]):
            if conditions.setdefault(cond["label"], cond) != cond:
                raise SaealignError(f"the runs steer {cond['label']!r} with different settings: they cannot join")
        for cell in run["cells"]:
            where = (cell["condition"], cell["topic"])
            seen = cells.setdefault(where, cell)
            if any(seen[k] != cell[k] for k in ("hit_rate_per_seed", "nll", "tokens")):
                raise SaealignError(f"row {where[0]!r} on {where[1]!r} differs between the runs: not the same measurement, "
                                    "so they cannot join")
    return {"cells": list(cells.values()), "config": runs[0]["config"], "conditions": list(conditions.values())}


def _unsteered_seeds(run: dict[str, Any]) -> list[int]:
    """The seeds a run's unsteered row was sampled on: its own where it had them, else the run's (as
    :meth:`saealign.evaluate.steer_bench.BenchConfig.seeds_of` chose them)."""
    return list(run["config"].get("unsteered_seeds") or run["config"]["seeds"])


def _settings(condition: dict[str, Any]) -> dict[str, Any]:
    """A row's settings as this version writes them: a spec saved before a field existed gets the field's default
    (which is what that run used: ``tune_steps`` 0 before run 11), so like rows of older and newer runs compare equal."""
    try:
        spec = GenerationSpec(**condition["spec"]).to_json()
    except (TypeError, SaealignError):  # a field this version does not know: compared as saved
        spec = condition["spec"]
    return {**condition, "spec": spec}


def _continuations(run: dict[str, Any], cell: dict[str, Any]) -> int:
    """How many continuations ``cell`` read: openers x the seeds it was sampled on (the unsteered row may have more)."""
    return int(run["config"]["n_openers"]) * len(cell["hit_rate_per_seed"])


def _pool_cell(runs: list[dict[str, Any]], label: str, topic: str) -> dict[str, Any]:
    found = []
    for run in runs:
        mine = [c for c in run["cells"] if c["condition"] == label and c["topic"] == topic]
        base = [c for c in run["cells"] if c["condition"] == "none" and c["topic"] == topic]
        if len(mine) != 1 or len(base) != 1:
            raise SaealignError(f"a run lacks the cell ({label!r}, {topic!r}) or holds it twice: it cannot pool")
        found.append((mine[0], base[0], _continuations(run, mine[0])))
    n = sum(k for _, _, k in found)
    hits = sum(c["hit_rate"] * k for c, _, k in found)
    d2 = [c["distinct2"] / b["distinct2"] for c, b, _ in found if b["distinct2"]]
    texts = all(c.get("nll_per_text") for c, _, _ in found)
    return {"condition": label, "topic": topic, "group": found[0][0]["group"], "continuations": n,
            "nll_per_text": [x for c, _, _ in found for x in c["nll_per_text"]] if texts else [],
            "tokens_per_text": [x for c, _, _ in found for x in c["tokens_per_text"]] if texts else [],
            "hits": round(hits), "hit_rate": hits / n,
            "hit_rate_per_seed": [h for c, _, _ in found for h in c["hit_rate_per_seed"]],
            "nll": sum(c["nll"] for c, _, _ in found), "tokens": sum(c["tokens"] for c, _, _ in found),
            "distinct2_ratio_weighted": (float(np.average(d2, weights=[k for _, _, k in found]))
                                         if len(d2) == len(found) else float("nan"))}


def _ppl(cell: dict[str, Any]) -> float:
    return math.exp(cell["nll"] / cell["tokens"]) if cell["tokens"] else float("nan")


def _summary(cells: list[dict[str, Any]], labels: list[str], n_openers: int) -> list[dict[str, Any]]:
    base = {c["topic"]: c for c in cells if c["condition"] == "none"}
    rows = []
    for label in labels:
        mine = [c for c in cells if c["condition"] == label]
        ratios = [_ppl(c) / _ppl(base[c["topic"]]) for c in mine]
        per_seed = np.array([c["hit_rate_per_seed"] for c in mine]).mean(axis=0)
        rows.append({"condition": label, "hit_rate": float(np.mean([c["hit_rate"] for c in mine])),
                     "hit_rate_std": float(np.std(per_seed)), "hits": sum(c["hits"] for c in mine),
                     "continuations": sum(c["continuations"] for c in mine),
                     "ppl_ratio": float(np.exp(np.mean(np.log(ratios)))),
                     "distinct2_ratio_weighted": float(np.mean([c["distinct2_ratio_weighted"] for c in mine])),
                     "topics_hit_at_least_half": int(sum(c["hit_rate"] >= 0.5 for c in mine))}
                    | ppl_interval_columns([(c["nll_per_text"], c["tokens_per_text"]) for c in mine],
                                           [(base[c["topic"]]["nll_per_text"], base[c["topic"]]["tokens_per_text"])
                                            for c in mine], n_openers))
    return rows
