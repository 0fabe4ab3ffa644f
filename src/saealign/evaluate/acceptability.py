"""Linguistic acceptability of generated text: a CoLA-trained classifier on a causal LM's features.

The paper scores generations with a CoLA classifier. We train our own, cheaply, on CPU: the LM reads
each sentence once; the features are its mean-pooled hidden states at two layers (middle and last)
plus a few LM-probability figures (mean, min and spread of token log-probs, log-prob per word, length);
a balanced logistic regression on the standardised features does the rest. Trained once per
(model, data, config) and cached; the dev accuracy and Matthews correlation (MCC) travel with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign.cache import atomic_dir, cache_dir, hash_file, hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.text_files import jsonl_rows
from saealign.residual_stream import content_mask, special_token_ids

SPLITS = {"train": "cola_train.jsonl.gz", "dev_in": "cola_dev_in.jsonl.gz", "dev_out": "cola_dev_out.jsonl.gz"}
FEATURE_VERSION = 1
"""Bump when ``features`` changes, so cached classifiers built on old features are not reused."""
MAX_TOKENS = 256
N_LM_FEATURES = 5


def read_cola(folder: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """``{split: (texts, labels [n] int64)}`` for ``train``, ``dev_in``, ``dev_out`` (1 acceptable, 0 not)."""
    folder = Path(folder)
    needed = ", ".join(SPLITS.values())
    if not folder.is_dir():
        raise SaealignError(f"CoLA folder {folder} not found: pass a folder holding {needed}")
    out: dict[str, tuple[list[str], np.ndarray]] = {}
    for split, name in SPLITS.items():
        path = folder / name
        if not path.exists():
            raise SaealignError(f"{path} is missing: the CoLA folder must hold {needed}")
        texts, labels = [], []
        for where, row in jsonl_rows(path):
            if not isinstance(row.get("text"), str) or row.get("label") not in (0, 1):
                raise SaealignError(f"{where}: need a string `text` and `label` 0 or 1")
            texts.append(row["text"])
            labels.append(int(row["label"]))
        if not texts or (split == "train" and len(set(labels)) < 2):
            raise SaealignError(f"{path} needs rows of both labels (0 and 1) to train a classifier")
        out[split] = (texts, np.asarray(labels, dtype=np.int64))
    return out


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, Matthews correlation and count of 0/1 predictions. MCC is 0 when a row or column of
    the confusion matrix is empty (the usual convention, as scikit-learn)."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp, tn = float(np.sum(t & p)), float(np.sum(~t & ~p))
    fp, fn = float(np.sum(~t & p)), float(np.sum(t & ~p))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": (tp + tn) / len(t) if len(t) else float("nan"),
        "mcc": (tp * tn - fp * fn) / denom if denom else 0.0,
        "n": float(len(t)),
    }


def _start_id(tok: Any) -> int | None:
    """The id to put before each sentence when the tokenizer adds none, so the first word gets a
    log-prob and the attention sink sits on a token that is not pooled."""
    probe = tok("a")["input_ids"]
    if probe and probe[0] in special_token_ids(tok):
        return None  # the tokenizer adds its own BOS (Llama, Gemma)
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    return None


@torch.inference_mode()
def lm_features(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], batch_size: int = 32,
                progress: bool = False) -> np.ndarray:
    """Features of each text: ``[n, len(layers) * d_model + 5]`` float32.

    Pooled over content positions (not padding, special tokens or the first position, whose norm is
    10-100x the rest). Layer ``L`` is ``hidden_states[L + 1]`` (after block L; for the last block HF
    applies the final norm, harmless for features). Texts are batched by token length to waste little
    compute on padding; right padding, so causal attention never sees a pad before a real token.
    Texts longer than ``MAX_TOKENS`` are cut (CoLA sentences and 64-token generations are far shorter).
    """
    tok = lm.tokenizer
    start = _start_id(tok)
    specials = special_token_ids(tok)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    ids = [([start] if start is not None else []) + list(tok(t)["input_ids"]) for t in texts]
    ids = [row[:MAX_TOKENS] if row else [pad] for row in ids]
    words = np.array([max(1, len(t.split())) for t in texts], dtype=np.float32)
    order = np.argsort([len(r) for r in ids], kind="stable")
    out = np.zeros((len(texts), len(layers) * lm.d_model + N_LM_FEATURES), dtype=np.float32)
    for b in tqdm(range(0, len(order), batch_size), desc="acceptability features", unit="batch",
                  disable=not progress):
        chunk = order[b : b + batch_size]
        rows = [ids[i] for i in chunk]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        res = lm.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        keep = content_mask(input_ids, mask, specials)  # [b, s]
        weight = keep.float() / keep.sum(dim=1, keepdim=True).clamp(min=1)
        pooled = [torch.einsum("bs,bsd->bd", weight, res.hidden_states[L + 1].float()) for L in layers]
        lp = _logprob_features(res.logits, input_ids, keep, torch.from_numpy(words[chunk]))
        out[chunk] = torch.cat([*pooled, lp], dim=1).numpy()
    return out


def _logprob_features(logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor,
                      words: torch.Tensor) -> torch.Tensor:
    """Mean, min and std of the content tokens' log-probs, summed log-prob per word, log token count:
    ``logits [b, s, V], input_ids/keep [b, s], words [b] -> [b, 5]``. A text without content tokens gets zeros."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    scored = keep[:, 1:]  # target t is scored when position t is content; position 0 never is
    n = scored.sum(dim=1).float()
    safe_n = n.clamp(min=1)
    total = (logp * scored).sum(dim=1)
    mean = total / safe_n
    low = torch.where(scored, logp, torch.zeros_like(logp)).amin(dim=1)
    var = (((logp - mean[:, None]) * scored) ** 2).sum(dim=1) / safe_n
    feats = torch.stack([mean, low, var.sqrt(), total / words, torch.log1p(n)], dim=1)
    return torch.where((n > 0)[:, None], feats, torch.zeros_like(feats))


@dataclass(frozen=True)
class AcceptabilityConfig:
    """How the classifier is trained (every field enters the cache key)."""

    layers: tuple[int, ...] | None = None
    """Hidden-state layers pooled into features; ``None``: ``n_layers // 2`` and the last."""
    c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    """Inverse L2 strengths tried; the best by MCC on the validation split is refit on all of train."""
    val_fraction: float = 0.1
    """Share of train held out (seeded) to choose C."""
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.c_grid or min(self.c_grid) <= 0:
            raise SaealignError("c_grid needs at least one positive C")
        if not 0 < self.val_fraction < 1:
            raise SaealignError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True, eq=False)
class AcceptabilityClassifier:
    """A logistic regression on standardised ``lm_features`` of one model (``model_key``)."""

    model_key: str
    layers: tuple[int, ...]
    mean: np.ndarray
    """Feature means of the training set: ``[f]``."""
    std: np.ndarray
    """Feature standard deviations (zeros replaced by 1): ``[f]``."""
    coef: np.ndarray
    """Weights on the standardised features: ``[f]``."""
    intercept: float
    C: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{split: {accuracy, mcc, n}}`` for train, val (the C-selection split), dev_in, dev_out and dev."""

    def features(self, lm: LoadedModel, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """``[n, f]`` float32 features of ``texts`` under ``lm`` (which must be the training model)."""
        if lm.key != self.model_key:
            raise SaealignError(f"this acceptability classifier was trained on model {self.model_key}, not {lm.key}: "
                                "train one for this model with `saealign eval train-acceptability`")
        return lm_features(lm, texts, self.layers, batch_size, progress)

    def decision(self, feats: np.ndarray) -> np.ndarray:
        """Logits of ``feats [n, f]``: ``[n]`` float64."""
        return ((feats.astype(np.float64) - self.mean) / self.std) @ self.coef + self.intercept

    def predict_proba(self, lm: LoadedModel, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Probability that each text is acceptable: ``[n]`` float64. Blank texts get 0 (no sentence)."""
        p = 1.0 / (1.0 + np.exp(-self.decision(self.features(lm, texts, batch_size))))
        return np.where([not t.strip() for t in texts], 0.0, p) if len(texts) else p

    def save(self, path: Path) -> None:
        """Write ``classifier.json`` + ``weights.npz`` into the folder ``path`` (atomically; no pickle)."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            np.savez(tmp / "weights.npz", mean=self.mean, std=self.std, coef=self.coef)
            meta = {"model_key": self.model_key, "layers": list(self.layers), "intercept": self.intercept,
                    "C": self.C, "metrics": self.metrics, "feature_version": FEATURE_VERSION}
            (tmp / "classifier.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path, model_key: str) -> AcceptabilityClassifier:
        """Read a classifier saved by ``save``; it must have been trained on ``model_key``'s features."""
        path = Path(path)
        if not (path / "classifier.json").exists() or not (path / "weights.npz").exists():
            raise SaealignError(f"{path} holds no acceptability classifier (classifier.json + weights.npz): "
                                "train one with `saealign eval train-acceptability`")
        meta = json.loads((path / "classifier.json").read_text())
        if meta["model_key"] != model_key:
            raise SaealignError(f"the acceptability classifier in {path} was trained on model {meta['model_key']}, "
                                f"not {model_key}: train one for this model with `saealign eval train-acceptability`")
        if meta.get("feature_version") != FEATURE_VERSION:
            raise SaealignError(f"the acceptability classifier in {path} uses old features: train it again")
        with np.load(path / "weights.npz", allow_pickle=False) as w:
            mean, std, coef = w["mean"], w["std"], w["coef"]
        return cls(model_key=model_key, layers=tuple(meta["layers"]), mean=mean, std=std, coef=coef,
                   intercept=float(meta["intercept"]), C=float(meta["C"]), metrics=meta["metrics"])


def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """Balanced L2 logistic regression on standardised ``x [n, f]``: ``(coef [f], intercept)``."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise SaealignError("scikit-learn is not installed: run `pip install saealign[eval]`") from e
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    model.fit(x, y)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0])


def _predict(coef: np.ndarray, intercept: float, x: np.ndarray) -> np.ndarray:
    return (x @ coef + intercept > 0).astype(np.int64)


def train_acceptability(lm: LoadedModel, data_dir: Path, cache: bool = True, progress: bool = True,
                        max_train: int | None = None, config: AcceptabilityConfig | None = None
                        ) -> AcceptabilityClassifier:
    """Train (or load from the cache) the acceptability classifier of ``lm`` on the CoLA folder ``data_dir``.

    ``max_train`` subsamples train (seeded) when feature extraction of all 8.5k sentences is too slow.
    """
    cfg = config or AcceptabilityConfig()
    if max_train is not None and max_train < 10:
        raise SaealignError(f"max_train must be at least 10, got {max_train}")
    data = read_cola(Path(data_dir))
    layers = cfg.layers if cfg.layers is not None else tuple(sorted({lm.n_layers // 2, lm.n_layers - 1}))
    key = hash_json({"model": lm.key, "data": {s: hash_file(Path(data_dir) / f) for s, f in SPLITS.items()},
                     "config": asdict(cfg), "layers": list(layers), "max_train": max_train,
                     "feature_version": FEATURE_VERSION})
    folder = cache_dir("acceptability", key)
    if cache and (folder / "classifier.json").exists():
        return AcceptabilityClassifier.load(folder, lm.key)

    rng = np.random.default_rng(cfg.seed)
    texts, y = data["train"]
    if max_train is not None and max_train < len(texts):
        pick = np.sort(rng.choice(len(texts), size=max_train, replace=False))
        texts, y = [texts[i] for i in pick], y[pick]
    feats = {"train": lm_features(lm, texts, layers, cfg.batch_size, progress)}
    for split in ("dev_in", "dev_out"):
        feats[split] = lm_features(lm, data[split][0], layers, cfg.batch_size, progress)

    mean = feats["train"].astype(np.float64).mean(axis=0)
    std = feats["train"].astype(np.float64).std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # constant features (e.g. a tiny model's saturated unit) stay 0
    z = {s: (f.astype(np.float64) - mean) / std for s, f in feats.items()}
    labels = {"train": y, "dev_in": data["dev_in"][1], "dev_out": data["dev_out"][1]}

    perm = rng.permutation(len(y))
    n_val = max(1, round(cfg.val_fraction * len(y)))
    val, fit = perm[:n_val], perm[n_val:]
    best_c, val_metrics = 0.0, {"mcc": -math.inf}
    for c in sorted(cfg.c_grid):  # ascending, and ties keep the first: the stronger regularisation wins
        coef, b = _fit_logistic(z["train"][fit], y[fit], c)
        scores = binary_metrics(y[val], _predict(coef, b, z["train"][val]))
        if scores["mcc"] > val_metrics["mcc"]:
            best_c, val_metrics = c, scores
    coef, b = _fit_logistic(z["train"], y, best_c)

    metrics = {s: binary_metrics(labels[s], _predict(coef, b, z[s])) for s in ("train", "dev_in", "dev_out")}
    metrics["val"] = val_metrics
    metrics["dev"] = binary_metrics(np.concatenate([labels["dev_in"], labels["dev_out"]]),
                                    _predict(coef, b, np.concatenate([z["dev_in"], z["dev_out"]])))
    clf = AcceptabilityClassifier(model_key=lm.key, layers=tuple(layers), mean=mean, std=std, coef=coef,
                                  intercept=b, C=best_c, metrics=metrics)
    if cache:
        clf.save(folder)
    return clf


def acceptability_rate(clf: AcceptabilityClassifier, lm: LoadedModel, texts: Sequence[str]) -> float:
    """Share of ``texts`` the classifier calls acceptable (probability >= 0.5); NaN for no texts."""
    if not texts:
        return float("nan")
    return float(np.mean(clf.predict_proba(lm, texts) >= 0.5))
