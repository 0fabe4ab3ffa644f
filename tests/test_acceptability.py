"""The CoLA acceptability classifier on a tiny random LM and a CoLA-like folder with a learnable rule."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

import saealign.evaluate.acceptability as acc
from conftest import WORDS
from saealign.errors import SaealignError
from saealign.evaluate.acceptability import (
    AcceptabilityClassifier,
    AcceptabilityConfig,
    acceptability_rate,
    binary_metrics,
    lm_features,
    read_cola,
    train_acceptability,
)
from saealign.models import LoadedModel

# Unacceptable sentences (label 0) carry two words from BAD, acceptable ones two from GOOD, among
# shared filler words: a rule that a linear model on mean-pooled hidden states can learn.
BAD, GOOD = ("cat", "dog", "bird", "fish"), ("sun", "moon", "star", "sky")
# A generous grid for the tiny model, which still exercises the C selection.
CONFIG = AcceptabilityConfig(layers=(0, 1), c_grid=(0.1, 1.0))


def _sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` sentences, alternately label 0 (two BAD words) and 1 (two GOOD words)."""
    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in BAD + GOOD]
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        sent = [rng.choice(filler) for _ in range(rng.randint(3, 6))]
        for _ in range(2):
            sent.insert(rng.randrange(len(sent) + 1), rng.choice(GOOD if label else BAD))
        texts.append(" ".join(sent))
        labels.append(label)
    return texts, labels


def _write_cola(folder: Path, sizes: dict[str, int] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, n) in enumerate((sizes or {"train": 160, "dev_in": 40, "dev_out": 40}).items()):
        texts, labels = _sentences(n, seed)
        with gzip.open(folder / acc.SPLITS[split], "wt", encoding="utf-8") as f:
            for t, y in zip(texts, labels, strict=True):
                f.write(json.dumps({"text": t, "label": y, "source": "cola"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def cola(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_cola(tmp_path_factory.mktemp("cola"))


@pytest.fixture(scope="module")
def trained(tiny_lm: LoadedModel, cola: Path) -> AcceptabilityClassifier:
    return train_acceptability(tiny_lm, cola, cache=False, progress=False, config=CONFIG)


def test_read_cola(cola: Path) -> None:
    data = read_cola(cola)
    assert set(data) == {"train", "dev_in", "dev_out"}
    texts, labels = data["train"]
    assert len(texts) == 160 and labels.dtype == np.int64
    assert [bool(set(t.split()) & set(BAD)) for t in texts] == [y == 0 for y in labels]


def test_missing_folder_or_file(tmp_path: Path, cola: Path) -> None:
    with pytest.raises(SaealignError, match="cola_train.jsonl.gz"):
        read_cola(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / acc.SPLITS["train"]).write_bytes((cola / acc.SPLITS["train"]).read_bytes())
    with pytest.raises(SaealignError, match="cola_dev_in.jsonl.gz is missing"):
        read_cola(partial)


def test_features_pool_content_only(tiny_lm: LoadedModel) -> None:
    """A text's features do not depend on its batch mates (padding is excluded everywhere)."""
    texts = ["the cat sat", "a big old dog runs over the green tree near the river", "sun"]
    alone = np.concatenate([lm_features(tiny_lm, [t], (0, 1)) for t in texts])
    together = lm_features(tiny_lm, texts, (0, 1), batch_size=3)
    assert together.shape == (3, 2 * tiny_lm.d_model + acc.N_LM_FEATURES)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    # the last LM feature is log(1 + content tokens): 3 words, the BOS excluded
    assert together[0, -1] == pytest.approx(np.log1p(3))


def test_classifier_learns_the_rule(trained: AcceptabilityClassifier) -> None:
    assert trained.layers == (0, 1)
    assert trained.C in CONFIG.c_grid
    assert trained.metrics["train"]["accuracy"] >= 0.95
    assert trained.metrics["dev"]["n"] == 80
    assert trained.metrics["dev"]["accuracy"] >= 0.85


def test_rate_and_blank_text(trained: AcceptabilityClassifier, tiny_lm: LoadedModel) -> None:
    good, bad = "the sun sat near the sky", "the dog sat near the fish"
    p = trained.predict_proba(tiny_lm, [good, bad, "  "])
    assert p[2] == 0.0
    assert acceptability_rate(trained, tiny_lm, [good, "  "]) == float(p[0] >= 0.5) / 2
    assert np.isnan(acceptability_rate(trained, tiny_lm, []))


def test_save_load_round_trip(trained: AcceptabilityClassifier, tiny_lm: LoadedModel, tmp_path: Path) -> None:
    texts = _sentences(10, seed=7)[0]
    trained.save(tmp_path / "clf")
    loaded = AcceptabilityClassifier.load(tmp_path / "clf", tiny_lm.key)
    assert np.array_equal(loaded.predict_proba(tiny_lm, texts), trained.predict_proba(tiny_lm, texts))
    assert loaded.metrics == trained.metrics and loaded.C == trained.C and loaded.layers == trained.layers


def test_load_rejects_other_model(trained: AcceptabilityClassifier, tiny_lm: LoadedModel, tmp_path: Path) -> None:
    trained.save(tmp_path / "clf")
    with pytest.raises(SaealignError, match="trained on model tiny"):
        AcceptabilityClassifier.load(tmp_path / "clf", "another-model")
    other = LoadedModel(tiny_lm.model, tiny_lm.tokenizer, "other", "other-key", 0.0)
    with pytest.raises(SaealignError, match="not other-key"):
        trained.predict_proba(other, ["the dog"])
    with pytest.raises(SaealignError, match="no acceptability classifier"):
        AcceptabilityClassifier.load(tmp_path / "empty", tiny_lm.key)


def test_cache_hit_skips_training(tiny_lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))
    folder = _write_cola(tmp_path / "cola", {"train": 40, "dev_in": 10, "dev_out": 10})
    cfg = AcceptabilityConfig(c_grid=(0.1, 1.0))  # default layers
    calls: list[float] = []
    real_fit = acc._fit_logistic

    def counting_fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
        calls.append(c)
        return real_fit(x, y, c)

    monkeypatch.setattr(acc, "_fit_logistic", counting_fit)
    first = train_acceptability(tiny_lm, folder, progress=False, config=cfg)
    assert len(calls) == len(cfg.c_grid) + 1  # one fit per C, then the refit on all of train
    assert first.layers == (1,)  # n_layers // 2 and the last coincide for a 2-block model
    second = train_acceptability(tiny_lm, folder, progress=False, config=cfg)
    assert len(calls) == len(cfg.c_grid) + 1
    assert np.array_equal(second.coef, first.coef) and second.metrics == first.metrics
    train_acceptability(tiny_lm, folder, progress=False, max_train=20, config=cfg)  # another key: trains
    assert len(calls) == 2 * (len(cfg.c_grid) + 1)


def test_binary_metrics_match_sklearn() -> None:
    from sklearn.metrics import matthews_corrcoef

    y_true = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    y_pred = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    m = binary_metrics(y_true, y_pred)
    # tp 3, tn 3, fp 1, fn 1: MCC = (9 - 1) / sqrt(4 * 4 * 4 * 4) = 0.5
    assert m["mcc"] == pytest.approx(0.5) == pytest.approx(matthews_corrcoef(y_true, y_pred))
    assert m["accuracy"] == 0.75 and m["n"] == 8
    assert binary_metrics(y_true, np.ones(8, dtype=int))["mcc"] == 0.0 == matthews_corrcoef(y_true, np.ones(8))


def test_config_validation() -> None:
    with pytest.raises(SaealignError, match="positive C"):
        AcceptabilityConfig(c_grid=())
    with pytest.raises(SaealignError, match="val_fraction"):
        AcceptabilityConfig(val_fraction=1.0)
