"""The benchmark's independent topic classifier: which topic of its group a text is about.

Features come from a sentence embedder (the aligner's MiniLM by default: 10x cheaper on a CPU than the judge's
hidden states) or from a language model's mean-pooled hidden states (:func:`text_features`, e.g. the judge), fed
to a logistic regression per group, trained on the topics' held-out texts, which steering never sees (M1 scores
latents by distance to the *alignment* texts; the classifier is a separate model fitted on other texts). Its
accuracy on a held-out fifth of those texts is reported with every benchmark, so a hit rate can be read against
what the classifier can tell apart at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from saealign.errors import SaealignError
from saealign.evaluate.bench_topics import BenchTopic
from saealign.models import LoadedModel
from saealign.reference.embed import TextEmbedder


@torch.inference_mode()
def text_features(lm: LoadedModel, texts: Sequence[str], max_tokens: int = 64, batch: int = 16) -> np.ndarray:
    """``[n, d_model]`` float32 unit vectors: each text's mean hidden state at the middle layer (specials excluded)."""
    tok = lm.tokenizer
    layer = lm.n_layers // 2
    device = next(lm.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    for b in range(0, len(texts), batch):
        chunk = [t if t.strip() else "." for t in texts[b:b + batch]]
        ids = [list(tok(t)["input_ids"])[:max_tokens] for t in chunk]
        width = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, r in enumerate(ids):
            input_ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        # logits_to_keep=1: the LM head over Gemma's 262k-token vocabulary would dwarf the rest of the pass
        hidden = lm.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                          logits_to_keep=1).hidden_states[layer + 1].float().cpu()
        keep = mask.bool()
        keep[:, 0] = False  # the first position (BOS) carries no content and a huge norm
        keep |= mask.bool() & (keep.sum(1, keepdim=True) == 0)  # a one-token text keeps its token
        pooled = (hidden * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


@dataclass
class GroupModel:
    names: list[str]
    model: object
    accuracy: float
    """On a held-out fifth of the topics' held-out texts."""


class TopicClassifier:
    """One logistic regression per group over the features of ``source``: a :class:`TextEmbedder` or a model."""

    def __init__(self, source: TextEmbedder | LoadedModel, topics: Sequence[BenchTopic], seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression

        self.source = source
        self.groups: dict[str, GroupModel] = {}
        by_group: dict[str, list[BenchTopic]] = {}
        for t in topics:
            by_group.setdefault(t.group, []).append(t)
        for group, members in by_group.items():
            if len(members) < 2:
                raise SaealignError(f"group {group} has {len(members)} topic: a classifier needs at least 2")
            texts = [x for t in members for x in t.heldout]
            labels = np.array([i for i, t in enumerate(members) for _ in t.heldout])
            feats = self.features(texts)
            order = np.random.default_rng(seed).permutation(len(texts))
            test = np.zeros(len(texts), dtype=bool)
            test[order[: len(texts) // 5]] = True
            probe = LogisticRegression(max_iter=2000, C=10.0).fit(feats[~test], labels[~test])
            accuracy = float((probe.predict(feats[test]) == labels[test]).mean())
            final = LogisticRegression(max_iter=2000, C=10.0).fit(feats, labels)
            self.groups[group] = GroupModel([t.name for t in members], final, accuracy)

    def features(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(self.source, LoadedModel):
            return text_features(self.source, texts)
        return np.asarray(self.source.embed([t if t.strip() else "." for t in texts]), dtype=np.float32)

    def predict(self, texts: Sequence[str], group: str) -> list[str]:
        """The topic name each text is classified as, among its group's topics."""
        model = self.groups[group]
        picks = model.model.predict(self.features(texts))  # type: ignore[attr-defined]
        return [model.names[int(i)] for i in picks]
