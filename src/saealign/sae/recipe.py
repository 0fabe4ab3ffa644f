"""One SAE training run from a text collection: the held-out split, the recipe saved with the SAEs, the resume key.

``saealign train-sae`` reads a corpus and calls :func:`plan_run`, then
:func:`saealign.sae.training.train_and_save` with what it returns.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from saealign.cache import cache_dir, hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.sae.train_config import TrainConfig


@dataclass(frozen=True)
class TrainingRun:
    train_texts: list[str]
    eval_texts: list[str]
    """Held-out texts the reported quality figures are measured on."""
    recipe: dict[str, Any]
    """What produced the SAEs (saved in their config)."""
    key: str
    """Hash of the recipe and the configuration: where checkpoints resume from."""

    @property
    def checkpoint_dir(self) -> Any:
        return cache_dir("train", self.key)


def plan_run(lm: LoadedModel, model_spec: str, corpus_spec: str, texts: Sequence[str], fingerprint: str,
             cfg: TrainConfig, holdout: float = 0.05, n_eval: int = 500) -> TrainingRun:
    """Shuffle ``texts`` (seeded by ``cfg.seed``), hold out a ``holdout`` share, evaluate on its first ``n_eval``."""
    if not 0 < holdout < 1:
        raise SaealignError("--holdout must be between 0 and 1")
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    n_hold = max(1, int(len(order) * holdout))
    held, train = order[:n_hold], order[n_hold:]
    train_texts = [texts[i] for i in train]
    eval_texts = [texts[i] for i in held[:n_eval]]
    recipe = {
        "model": model_spec, "model_key": lm.key, "corpus": corpus_spec, "corpus_fingerprint": fingerprint,
        "corpus_texts": len(texts), "holdout_fraction": holdout, "eval_texts": len(eval_texts),
        "dtype": str(next(lm.model.parameters()).dtype),
    }
    return TrainingRun(train_texts, eval_texts, recipe, hash_json({"recipe": recipe, "cfg": repr(cfg)}))
