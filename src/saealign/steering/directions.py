"""Topic directions for the additive methods (``add``, ``swap_add``): which way to push the residual stream.

Swap only re-ranks the latents a context already activates, so it cannot bring in a topic the context
lacks. The additive methods add ``strength × ρ × v`` to the residual stream at the SAE's layer, where

- ``v`` is the unit vector along ``Σ_i w_i · d_i / |d_i|`` over the ``n_latents`` latents of largest
  ``w_i = score_i × output_i × contrast_i × match_i`` (``d_i`` the decoder row of latent i, ``score_i`` its M1
  topic score, ``contrast_i`` how much more it fires on the topic texts than on reference text,
  :mod:`saealign.reference.contrast`, ``match_i`` how near the words it makes the model say are to the topic
  texts, :mod:`saealign.steering.descriptions`; each factor can be left out with the spec's ``output_scores``,
  ``contrast`` and ``output_match``);
- ``output_i`` is the latent's *output score* (after Arad, Mueller & Belinkov 2025, "SAEs are good for
  steering, if you select the right features"): how much probability the latent's own logit-lens
  tokens gain when the latent is added at the last position of neutral prompts, as a rank percentile
  among the SAE's latents (0 = no gain, 1 = the largest). Latents that fire on topic text but do not
  make the model *say* their tokens score low. The rank, not the raw gain: raw gains are dominated by
  a few latents that push very frequent tokens (of, by, to), which would then make every topic's
  direction. Computed once per model, SAE and layer (:class:`SteeringBasis`, cached on disk; shipped for
  the default SAEs);
- ``ρ`` is the median norm of the residual stream at that layer over neutral text, so a strength means
  the same push for every model and layer (0.3 = 30 % of a typical residual's length).

The basis also holds each latent's mean activation on the model's *own* unsteered text
(:data:`DEFAULT_TEXT`): what the model writes when nobody steers it, the second half of the contrast's
reference (:meth:`saealign.steering.aligner.Aligner.reference_mean`).
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saealign.cache import atomic_write_bytes, cache_dir, hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.reference.contrast import mean_activation
from saealign.residual_stream import content_mask, layer_module, special_token_ids
from saealign.sae.autoencoder import SAE, sae_key

BASIS_VERSION = 3

DEFAULT_TEXT = {"seeds": 4, "max_new_tokens": 48, "top_k": 5}
"""How the model's own text is sampled for :attr:`SteeringBasis.default_mean`: each neutral prompt continued
unsteered with these seeds (prompt + continuation are read)."""


@dataclass(frozen=True)
class SteeringBasis:
    """What the additive methods need to know about one model + SAE + layer, measured once."""

    output_scores: np.ndarray
    """``[d_sae]`` float32 in [0, 1]: each latent's output score (rank percentile of its gain; 0 = no gain)."""
    residual_norm: float
    """Median residual-stream norm at the layer over content tokens of neutral text."""
    key: str
    """``model-sae-layer`` key the basis holds for."""
    default_mean: np.ndarray
    """``[d_sae]`` float32 >= 0: each latent's mean activation per content token on the model's own unsteered
    continuations of the neutral prompts (:data:`DEFAULT_TEXT`)."""

    def to_json(self) -> dict[str, Any]:
        return {"version": BASIS_VERSION, "key": self.key, "residual_norm": self.residual_norm,
                "output_scores": [float(v) for v in self.output_scores],
                "default_mean": [float(v) for v in self.default_mean]}

    @classmethod
    def from_json(cls, data: dict[str, Any], key: str, d_sae: int) -> SteeringBasis:
        if data.get("version") != BASIS_VERSION or data.get("key") != key:
            raise SaealignError(f"the steering basis on disk is for {data.get('key')!r}, not {key!r}: it is rebuilt")
        scores = np.asarray(data["output_scores"], dtype=np.float32)
        default_mean = np.asarray(data["default_mean"], dtype=np.float32)
        norm = float(data["residual_norm"])
        if (scores.shape != (d_sae,) or default_mean.shape != (d_sae,) or not np.isfinite(scores).all()
                or not np.isfinite(default_mean).all() or (default_mean < 0).any() or not np.isfinite(norm) or norm <= 0):
            raise SaealignError("the steering basis on disk is corrupt (wrong size or non-finite values): it is rebuilt")
        return cls(scores, norm, key, default_mean)


def unit_decoder(sae: SAE) -> Tensor:
    """``[d_sae, d_in]`` decoder rows scaled to unit norm (dead rows stay 0), in float32."""
    w = sae.W_dec.detach().float()
    norms = w.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, w / norms.clamp_min(1e-12), torch.zeros_like(w))


def topic_direction(sae: SAE, scores: Tensor, n_latents: int, output_scores: Tensor | None = None,
                    contrast: Tensor | None = None, match: Tensor | None = None) -> Tensor:
    """The unit ``[d_in]`` float32 direction of a topic: see the module docstring.

    ``scores [d_sae]`` the M1 scores in [0, 1]; ``output_scores [d_sae]`` in [0, 1] or None (scores alone);
    ``contrast [d_sae]`` >= 0 (topic-vs-reference mean activation) or None; ``match [d_sae]`` >= 0 (how near the
    words each latent makes the model say are to the topic, :func:`saealign.steering.descriptions.output_match`)
    or None.
    """
    values, idx = chosen_latents(scores, n_latents, output_scores, contrast, match)
    v = (values.unsqueeze(1) * unit_decoder(sae).cpu()[idx]).sum(dim=0)
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SaealignError("the topic's latents cancel out: their decoder directions sum to 0")
    return v / norm


def chosen_latents(scores: Tensor, n_latents: int, output_scores: Tensor | None = None, contrast: Tensor | None = None,
                   match: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(weights [k] > 0, latent indices [k])`` float32 / int64 on the CPU: the ``k <= n_latents`` latents of largest
    ``w_i = score_i × output_i × contrast_i × match_i`` (the factors given) that the topic direction sums."""
    w = scores.detach().float().cpu()
    for factor in (output_scores, contrast, match):
        if factor is not None:
            w = w * factor.detach().float().cpu()
    w = torch.nan_to_num(w, nan=0.0).clamp_min(0)
    k = min(n_latents, int((w > 0).sum()))
    if k == 0:
        raise SaealignError("no latent scores for this topic, has an output effect, fires more on the topic texts "
                            "than on the reference and makes the model say topic-like words: nothing to steer along "
                            "(use a method without a direction, e.g. swap, or give more topic texts)")
    values, idx = w.topk(k)
    return values, idx


def _final_norm_weight(model: Any) -> Tensor | None:
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None) if inner is not None else None
    weight = getattr(norm, "weight", None)
    return weight.detach().float() if isinstance(weight, Tensor) else None


def unembedding(model: Any) -> Tensor:
    """``[vocab, d_model]`` float32 output embedding, or one clear error when the model has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise SaealignError("this model has no output embedding (lm_head) to read latents' output effects from: "
                            "the additive methods need one; use swap, weight or clamp")
    return weight.detach().float()


@torch.inference_mode()
def measure_basis(lm: LoadedModel, sae: SAE, layer: int, prompts: Sequence[str], default_texts: Sequence[str],
                  scale: float = 1.0, n_tokens: int = 10, chunk: int = 256, progress: bool = True) -> SteeringBasis:
    """Measure the residual norm and every latent's output score on ``prompts`` (neutral sentence openers), and
    every latent's mean activation on ``default_texts`` (the model's own unsteered text).

    For each prompt the prefix is run once (KV cache); then, for every latent in chunks, the last token
    is fed with ``scale × ρ × d_i`` added at the layer, and the probability mass of the latent's top
    ``n_tokens`` logit-lens tokens is compared with the unsteered one. The score is the mean gain
    (clipped at 0) as a rank percentile: 1 = the latent that most makes the model say its tokens, 0 = no gain.
    """
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    block = layer_module(model, layer)
    W_U = unembedding(model).to(device)
    g = _final_norm_weight(model)
    dirs = unit_decoder(sae).to(device)
    lens_dirs = dirs * g.to(device) if g is not None and g.shape[0] == dirs.shape[1] else dirs
    top_tokens = torch.cat([(lens_dirs[i:i + 1024] @ W_U.T).topk(n_tokens, dim=-1).indices
                            for i in range(0, dirs.shape[0], 1024)])  # [d_sae, n_tokens]
    specials = special_token_ids(tok)

    encoded = [list(tok(p)["input_ids"]) for p in prompts]
    if any(len(ids) < 3 for ids in encoded):
        raise SaealignError("output scores need prompts of at least 3 tokens")
    norms: list[Tensor] = []
    for ids in encoded:
        t = torch.tensor([ids], device=device)
        out = model(input_ids=t, output_hidden_states=True)
        hidden = out.hidden_states[layer % lm.n_layers + 1][0].float()
        keep = content_mask(t, torch.ones_like(t), specials)[0]
        norms.append(hidden[keep].norm(dim=-1))
    rho = float(torch.cat(norms).median())
    if not np.isfinite(rho) or rho <= 0:
        raise SaealignError(f"the residual stream at layer {layer} has norm {rho}: cannot scale a direction to it")

    gains = torch.zeros(dirs.shape[0], dtype=torch.float64)
    bar = tqdm(total=len(encoded) * dirs.shape[0], desc="output scores", unit="latent", disable=not progress)
    for ids in encoded:
        for start, base_logits, logits in pushed_last_logits(model, block, ids, dirs * (scale * rho), chunk):
            base = torch.softmax(base_logits, -1)
            probs = torch.softmax(logits, dim=-1)
            tokens = top_tokens[start:start + logits.shape[0]]
            gain = probs.gather(1, tokens).sum(1) - base[tokens].sum(1)
            gains[start:start + logits.shape[0]] += gain.double().cpu() / len(encoded)
            bar.update(logits.shape[0])
    bar.close()
    default_mean = mean_activation(lm, sae, layer, default_texts).astype(np.float32)
    return SteeringBasis(rank_scores(gains.numpy()), rho, basis_key(lm, sae, layer), default_mean)


def pushed_last_logits(model: Any, block: Any, ids: Sequence[int], pushes: Tensor,
                       chunk: int = 256) -> Iterator[tuple[int, Tensor, Tensor]]:
    """For one prompt ``ids``: its next-token logits at the last position unpushed, and with each row of ``pushes``
    ``[n, d_model]`` added to ``block``'s output there, ``chunk`` rows per forward call.

    Yields ``(start, base [vocab], logits [rows, vocab])`` (float32) per chunk of rows ``start:start + rows``. The
    prefix runs once; each chunk reuses a copy of its KV cache, so a push touches the last position alone.
    """
    device = next(model.parameters()).device
    add: dict[str, Tensor] = {}

    def hook(_mod: Any, _inp: Any, output: Any) -> Any:
        hidden = output if isinstance(output, Tensor) else output[0]
        hidden = hidden + add["v"].to(hidden.dtype).unsqueeze(1)
        return hidden if isinstance(output, Tensor) else (hidden, *output[1:])

    # transformers 5 renamed ``past_key_values`` to ``cache``; 4.x only knows the old name
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prefix = torch.tensor([list(ids[:-1])], device=device)
    base_cache = model(input_ids=prefix, use_cache=True).past_key_values
    last = torch.tensor([[ids[-1]]], device=device)
    base = model(input_ids=last, **{cache_name: copy.deepcopy(base_cache)}).logits[0, -1].float()
    for start in range(0, pushes.shape[0], chunk):
        stop = min(start + chunk, pushes.shape[0])
        cache = copy.deepcopy(base_cache)
        cache.batch_repeat_interleave(stop - start)
        add["v"] = pushes[start:stop]
        handle = block.register_forward_hook(hook, prepend=True)
        try:
            logits = model(input_ids=last.expand(stop - start, 1), **{cache_name: cache}).logits[:, -1].float()
        finally:
            handle.remove()
        yield start, base, logits

def rank_scores(gains: np.ndarray) -> np.ndarray:
    """``[d_sae]`` float32: each positive gain's rank percentile in (0, 1] (ties share a rank); 0 where gain <= 0."""
    g = np.asarray(gains, dtype=np.float64)
    out = np.zeros(g.shape, dtype=np.float32)
    positive = g > 0
    if positive.any():
        from scipy.stats import rankdata

        out[positive] = (rankdata(g[positive], method="max") / positive.sum()).astype(np.float32)
    return out


def basis_key(lm: LoadedModel, sae: SAE, layer: int) -> str:
    return f"{lm.key[:12]}-{sae_key(sae)}-L{layer % lm.n_layers}"


def load_or_measure_basis(lm: LoadedModel, sae: SAE, layer: int, prompts: Sequence[str],
                          default_texts: Callable[[], Sequence[str]], folder: Path | None = None,
                          progress: bool = True) -> SteeringBasis:
    """The basis for this model + SAE + layer from the cache (or a shipped file), measured and saved if absent
    (``default_texts`` is called only then: sampling the model's own text is part of the measurement)."""
    key = basis_key(lm, sae, layer)
    name = f"basis-{hash_json({'key': key, 'prompts': list(prompts), 'v': BASIS_VERSION, 'default': DEFAULT_TEXT})[:16]}.json"
    shipped = Path(__file__).resolve().parent.parent / "data" / "steering_basis" / name
    path = (folder or cache_dir() / "steering") / name
    for candidate in (shipped, path):
        if candidate.is_file():
            try:
                return SteeringBasis.from_json(json.loads(candidate.read_text(encoding="utf-8")), key, sae.d_sae)
            except (SaealignError, ValueError, KeyError, TypeError):
                continue  # a corrupt or foreign file is measured anew (and overwritten) below
    basis = measure_basis(lm, sae, layer, prompts, default_texts(), progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(basis.to_json()).encode())
    return basis
