"""One topic's latent scores (:class:`TopicScores`): the output of M1, the input of M2, saved as a folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from saealign.cache import atomic_dir
from saealign.errors import SaealignError

if TYPE_CHECKING:
    import torch

ARRAYS_FILE = "scores.safetensors"
META_FILE = "scores.json"
_FORMAT = "saealign.topic_scores"
_VERSION = 1
_ARRAY_FIELDS = ("scores", "g", "n_prompts", "scored")
_OPTIONAL_ARRAYS = ("contrast",)
_META_FIELDS = ("topic_texts", "summary", "metric", "min_prompts", "index_key", "sae_key", "note", "extra")


@dataclass(eq=False)
class TopicScores:
    """One topic's latent scores for one SAE and reference index (the output of M1, input of M2).

    Saved as a folder holding ``scores.safetensors`` (the ``[L]`` arrays) and ``scores.json`` (the
    rest), written atomically as a whole.
    """

    scores: np.ndarray
    """``[L]`` float32 in [0, 1], 1 = most aligned; 0 for unscored latents."""
    g: np.ndarray
    """``[L]`` float64 activation-weighted mean distance to the topic; NaN where a latent never fires."""
    n_prompts: np.ndarray
    """``[L]`` int64 reference prompts each latent fires on."""
    scored: np.ndarray
    """``[L]`` bool: fired on >= ``min_prompts`` prompts."""
    topic_texts: list[str]
    """The alignment texts P_align."""
    summary: str = "normalized_sum"
    """Prompt-level summary function (one of :data:`SUMMARIES`)."""
    metric: str = "euclidean"
    """Embedding distance used for d(p)."""
    min_prompts: int = 20
    """Latents firing on fewer prompts are unscored."""
    index_key: str = ""
    """Identifies the reference index the scores were made from."""
    sae_key: str = ""
    """Identifies the SAE (its latents are what the scores index)."""
    note: str | None = None
    """Anything a user should know about these scores (e.g. flat scores)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-serialisable facts cached with the scores (e.g. an automatic strength)."""
    contrast: np.ndarray | None = None
    """``[L]`` float32 >= 0 or None: how much more each latent fires on the topic texts than on reference
    text, per token (:mod:`saealign.reference.contrast`); the additive methods weigh latents by it. Filled
    by :meth:`saealign.steering.aligner.Aligner.topic` (it needs the model), None from the index alone."""

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.g = np.asarray(self.g, dtype=np.float64)
        self.n_prompts = np.asarray(self.n_prompts, dtype=np.int64)
        self.scored = np.asarray(self.scored, dtype=bool)
        shapes = {a.shape for a in (self.scores, self.g, self.n_prompts, self.scored)}
        if len(shapes) != 1 or self.scores.ndim != 1:
            raise SaealignError(f"TopicScores arrays must be [L] vectors of one length, got shapes {sorted(shapes)}")
        self.topic_texts = [str(t) for t in self.topic_texts]
        self.min_prompts = int(self.min_prompts)
        if self.contrast is not None:
            self.contrast = np.asarray(self.contrast, dtype=np.float32)
            if self.contrast.shape != self.scores.shape or not np.isfinite(self.contrast).all() or (self.contrast < 0).any():
                raise SaealignError(f"TopicScores.contrast must be a finite, non-negative [L] vector like the scores, "
                                    f"got shape {self.contrast.shape}")

    @property
    def d_sae(self) -> int:
        return int(self.scores.shape[0])

    def top(self, n: int) -> list[int]:
        """The ``n`` best scored latents: score descending, then lower g, then lower index."""
        if n < 0:
            raise SaealignError(f"top(n) needs n >= 0, got {n}")
        idx = np.flatnonzero(self.scored)
        order = np.lexsort((idx, self.g[idx], -self.scores[idx].astype(np.float64)))
        return [int(i) for i in idx[order[:n]]]

    def check_compatible(self, sae_key: str, d_sae: int) -> None:
        """Raise unless these scores index the latents of SAE ``sae_key`` with ``d_sae`` latents.

        An empty key on either side means unknown: then only the width is checked.
        """
        key_clash = bool(self.sae_key and sae_key and self.sae_key != sae_key)
        if key_clash or d_sae != self.d_sae:
            raise SaealignError(
                f"scores were made for SAE {self.sae_key or '?'} ({self.d_sae} latents) but this SAE is "
                f"{sae_key or '?'} ({d_sae} latents): re-score the topic"
            )

    def as_tensor(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  unscored: str = "drop") -> torch.Tensor:
        """Scores as a ``[L]`` tensor for steering (float32 unless ``dtype`` is given).

        ``unscored="drop"`` keeps the 0 of latents without a score (the paper's arithmetic: Swap never picks
        them); ``"neutral"`` gives them the median score of the scored latents: too little evidence to tell
        aligned from not is neither a veto nor a vote.
        """
        import torch

        values = self.scores
        if unscored == "neutral" and self.scored.any() and not self.scored.all():
            values = values.copy()
            values[~self.scored] = float(np.median(self.scores[self.scored]))
        elif unscored not in ("drop", "neutral"):
            raise SaealignError(f"unknown unscored policy {unscored!r}: use drop or neutral")
        return torch.as_tensor(values, device=device, dtype=dtype or torch.float32)

    def save(self, path: str | Path) -> Path:
        """Write the folder ``path`` (``scores.safetensors`` + ``scores.json``) atomically."""
        meta = {"format": _FORMAT, "version": _VERSION, "d_sae": self.d_sae}
        meta |= {k: getattr(self, k) for k in _META_FIELDS}
        try:
            meta_bytes = (json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as e:
            raise SaealignError(f"TopicScores.extra must be JSON-serialisable ({e}): store plain values") from e
        arrays = {k: getattr(self, k) for k in (*_ARRAY_FIELDS, *_OPTIONAL_ARRAYS) if getattr(self, k) is not None}
        final = Path(path)
        with atomic_dir(final) as tmp:
            (tmp / ARRAYS_FILE).write_bytes(save(arrays))
            (tmp / META_FILE).write_bytes(meta_bytes)
        return final

    @classmethod
    def load(cls, path: str | Path) -> TopicScores:
        """Read a folder written by :meth:`save`; one clear error for missing, corrupt or mismatched files."""
        folder = Path(path)
        meta_path, arrays_path = folder / META_FILE, folder / ARRAYS_FILE
        if not folder.is_dir() or not meta_path.is_file() or not arrays_path.is_file():
            raise SaealignError(f"no topic scores at {folder} (needs {META_FILE} and {ARRAYS_FILE}): score the topic first")
        try:
            meta = json.loads(meta_path.read_text())
            arrays = load_file(str(arrays_path))
        except (OSError, ValueError, SafetensorError) as e:
            raise SaealignError(f"topic scores at {folder} are corrupt ({e}): re-score the topic") from e
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise SaealignError(f"{meta_path} is not a saealign topic-scores file: re-score the topic")
        if meta.get("version") != _VERSION:
            raise SaealignError(f"topic scores at {folder} have version {meta.get('version')}, expected {_VERSION}: re-score")
        missing = [k for k in _ARRAY_FIELDS if k not in arrays] + [k for k in _META_FIELDS if k not in meta]
        if missing:
            raise SaealignError(f"topic scores at {folder} lack {missing}: re-score the topic")
        lengths = {k: arrays[k].shape for k in (*_ARRAY_FIELDS, *_OPTIONAL_ARRAYS) if k in arrays}
        if any(s != (meta.get("d_sae"),) for s in lengths.values()):
            raise SaealignError(f"topic scores at {folder} are mismatched ({lengths} vs d_sae {meta.get('d_sae')}): re-score")
        fields: dict[str, Any] = {k: arrays[k] for k in _ARRAY_FIELDS} | {k: meta[k] for k in _META_FIELDS}
        fields |= {k: arrays[k] for k in _OPTIONAL_ARRAYS if k in arrays}
        try:
            return cls(**fields)
        except SaealignError as e:
            raise SaealignError(f"topic scores at {folder} are corrupt ({e}): re-score the topic") from e
