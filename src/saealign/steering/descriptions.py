"""What each SAE latent makes the model say, in words, and how near that is to a topic: the *output match*.

A latent's M1 score says which texts make it fire (its input side); its output score
(:mod:`saealign.steering.directions`) says whether pushing it makes the model say its own logit-lens tokens at
all. Neither says whether what it makes the model say belongs to the topic. A latent that fires on banking
requests may push "configure", "utilize", "." or a first-person register, and a direction built on it spends its
push on words that no reader would take for banking.

So each latent is described by its *promoted tokens*: the next tokens whose log-probability gains most, on
average over neutral prompts, when ``scale × ρ × d_i`` is added at the last position (d_i the unit decoder row,
ρ the median residual norm); the whole-word ones among them, joined by spaces, make its description (after
the output-centric feature descriptions of Gur-Arieh et al. 2025 and the output scores of Arad, Mueller &
Belinkov 2025). The descriptions are measured once per model, SAE and layer, and embedded once per embedder
(both cached on disk, shipped for the default SAE).

A topic's output match is then, per latent, ``max(0, cos(e_i, c) − median_j cos(e_j, c))`` with ``e_i`` the
embedding of latent i's description and ``c`` the unit mean embedding of the topic texts: 0 for the half of
the latents whose words are least like the topic, growing with how much closer than typical the rest are.
Latents with no whole-word promoted token have no description and match 0.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign.cache import atomic_write_bytes, cache_dir, hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.embed import TextEmbedder
from saealign.residual_stream import layer_module
from saealign.sae.autoencoder import SAE
from saealign.steering.directions import basis_key, pushed_last_logits, unembedding, unit_decoder

DESCRIBE = {"prompts": 8, "scale": 0.5, "tokens": 20}
"""How descriptions are measured: neutral prompts averaged over, the push (× ρ) and how many promoted tokens
are kept per latent. 0.5 ρ moves the next token clearly without swamping the prompt (chosen on the steering
benchmark, docs/results.md)."""
DESCRIPTIONS_VERSION = 1
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")
"""A whole word of three or more letters: what a description keeps of a promoted token (subword pieces and
punctuation say little to a sentence embedder)."""


@dataclass(frozen=True)
class LatentDescriptions:
    """Each latent's promoted tokens and the description made of them, for one model + SAE + layer."""

    token_ids: np.ndarray
    """``[d_sae, tokens]`` int64: the next tokens each latent's push most raises, best first."""
    words: list[str]
    """Each latent's description: the distinct whole-word tokens among its promoted ones, in order ("" if none)."""
    key: str
    """``model-sae-layer`` key they hold for."""

    def to_json(self) -> dict[str, Any]:
        return {"version": DESCRIPTIONS_VERSION, "key": self.key, "token_ids": self.token_ids.tolist(),
                "words": self.words}

    @classmethod
    def from_json(cls, data: dict[str, Any], key: str, d_sae: int) -> LatentDescriptions:
        if data.get("version") != DESCRIPTIONS_VERSION or data.get("key") != key:
            raise SaealignError(f"the latent descriptions on disk are for {data.get('key')!r}, not {key!r}")
        ids = np.asarray(data["token_ids"], dtype=np.int64)
        words = [str(w) for w in data["words"]]
        if ids.ndim != 2 or ids.shape[0] != d_sae or len(words) != d_sae or (ids < 0).any():
            raise SaealignError("the latent descriptions on disk are corrupt (wrong size): they are measured anew")
        return cls(ids, words, key)


def describe(tokenizer: Any, token_ids: np.ndarray) -> list[str]:
    """One description per row of ``token_ids``: the distinct (case-blind) whole words among its tokens, in order."""
    out = []
    for row in token_ids:
        words: list[str] = []
        seen: set[str] = set()
        for token in row:
            word = tokenizer.decode([int(token)]).strip()
            if _WORD.fullmatch(word) and word.lower() not in seen:
                seen.add(word.lower())
                words.append(word)
        out.append(" ".join(words))
    return out


@torch.inference_mode()
def promoted_tokens(lm: LoadedModel, sae: SAE, layer: int, prompts: Sequence[str], rho: float,
                    scale: float = DESCRIBE["scale"], n_tokens: int = int(DESCRIBE["tokens"]), chunk: int = 256,
                    progress: bool = True) -> np.ndarray:
    """``[d_sae, n_tokens]``: per latent, the tokens whose next-token log-probability rises most on average over
    ``prompts`` when ``scale × rho × d_i`` is added at the layer's last position (best first)."""
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    block = layer_module(model, layer)
    encoded = [list(tok(p)["input_ids"]) for p in prompts]
    if not encoded or any(len(ids) < 2 for ids in encoded):
        raise SaealignError("latent descriptions need neutral prompts of at least 2 tokens")
    dirs = unit_decoder(sae).to(device) * (scale * rho)
    n_tokens = min(n_tokens, int(unembedding(model).shape[0]))  # one clear error for a model without one
    out = np.zeros((dirs.shape[0], n_tokens), dtype=np.int64)
    bar = tqdm(total=dirs.shape[0], desc="latent descriptions", unit="latent", disable=not progress)
    # one probe per prompt, advanced chunk by chunk together: each prefix runs once, and only one chunk's
    # [rows, vocab] sum is held at a time
    probes = [pushed_last_logits(model, block, ids, dirs, chunk) for ids in encoded]
    for chunks in zip(*probes, strict=True):
        start, rows = chunks[0][0], chunks[0][2].shape[0]
        deltas = [torch.log_softmax(logits, -1) - torch.log_softmax(base, -1) for _, base, logits in chunks]
        total = deltas[0]
        for delta in deltas[1:]:  # in prompt order, as the shipped descriptions were summed
            total = total + delta
        out[start:start + rows] = total.topk(n_tokens, dim=-1).indices.cpu().numpy()
        bar.update(rows)
    bar.close()
    return out


def load_or_measure_descriptions(lm: LoadedModel, sae: SAE, layer: int, prompts: Sequence[str], rho: float,
                                 folder: Path | None = None, progress: bool = True) -> LatentDescriptions:
    """The descriptions for this model + SAE + layer from the cache (or a shipped file), measured and saved if
    absent (a minute or two on a CPU for the default SAE)."""
    key = basis_key(lm, sae, layer)
    name = f"descriptions-{_file_key(key, prompts, rho)}.json"
    path = (folder or cache_dir() / "steering") / name
    for candidate in (_SHIPPED / name, path):
        if candidate.is_file():
            try:
                return LatentDescriptions.from_json(json.loads(candidate.read_text(encoding="utf-8")), key, sae.d_sae)
            except (SaealignError, ValueError, KeyError, TypeError):
                continue  # a corrupt or foreign file is measured anew (and overwritten) below
    ids = promoted_tokens(lm, sae, layer, prompts, rho, progress=progress)
    found = LatentDescriptions(ids, describe(lm.tokenizer, ids), key)
    atomic_write_bytes(path, json.dumps(found.to_json()).encode())  # compact: indented, the ids take 1.5x
    return found


def description_embeddings(descriptions: LatentDescriptions, embedder: TextEmbedder, folder: Path | None = None,
                           progress: bool = True) -> np.ndarray:
    """``[d_sae, dim]`` float32 unit rows: each description embedded (0 rows for latents without one); cached per
    embedder next to the descriptions (float16 on disk)."""
    name = f"description-embeddings-{hash_json({'words': descriptions.words, 'embedder': embedder.fingerprint})[:16]}.npy"
    path = (folder or cache_dir() / "steering") / name
    for candidate in (_SHIPPED / name, path):
        if candidate.is_file():
            try:
                found = np.load(candidate, allow_pickle=False).astype(np.float32)
            except (ValueError, OSError):
                continue
            if found.shape == (len(descriptions.words), embedder.dim) and np.isfinite(found).all():
                return found
    present = [i for i, w in enumerate(descriptions.words) if w]
    out = np.zeros((len(descriptions.words), embedder.dim), dtype=np.float32)
    if present:
        out[present] = embedder.embed([descriptions.words[i] for i in present], progress=progress)
    stored = out.astype(np.float16)
    atomic_write_bytes(path, _npy_bytes(stored))
    return stored.astype(np.float32)  # what a later load returns, bit for bit


def output_match(embeddings: np.ndarray, topic_embeddings: np.ndarray) -> np.ndarray:
    """``[d_sae]`` float32 >= 0: how much nearer than the median latent's each latent's description is to the
    topic's mean embedding (see the module docstring). ``topic_embeddings [n, dim]`` embeds the topic texts."""
    centre = np.asarray(topic_embeddings, dtype=np.float64).mean(axis=0)
    norm = float(np.linalg.norm(centre))
    if not np.isfinite(norm) or norm == 0:
        raise SaealignError("the topic texts' embeddings cancel out (mean 0): no output match can be read from them")
    similarity = np.asarray(embeddings, dtype=np.float64) @ (centre / norm)
    described = np.linalg.norm(embeddings, axis=1) > 0
    if not described.any():
        raise SaealignError("no latent of this SAE has a whole-word description: steer with output_match=False")
    match = np.maximum(similarity - np.median(similarity[described]), 0.0)
    return np.where(described, match, 0.0).astype(np.float32)


_SHIPPED = Path(__file__).resolve().parent.parent / "data" / "steering_basis"


def _file_key(key: str, prompts: Sequence[str], rho: float) -> str:
    return hash_json({"key": key, "prompts": list(prompts), "rho": round(rho, 4), "v": DESCRIPTIONS_VERSION,
                      "describe": DESCRIBE})[:16]


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
