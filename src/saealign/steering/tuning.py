"""Tuned latent weights: the push's mix of SAE latents, tuned so that the pushed model finds the topic texts likely.

``add`` pushes along ``unit(Σ_i w_i · d_i)`` over the topic's best latents (:mod:`saealign.steering.directions`),
with weights ``w_i`` read off statistics of each latent (topic score, output score, contrast, output match). Those
statistics say which latents belong to the topic, not how the model reads their sum: a mix that fires the topic's
latents can still pull the text off the model's fluent paths, and the judge's perplexity pays for it.

Tuning keeps the latents, the layers and the push's length (``strength × ρ`` at each layer) and changes the mix
alone: a few Adam steps on ``log w`` (so every weight stays positive and the direction stays inside the cone of the
topic's own decoder rows) that lower the mean next-token loss of the topic texts while every pushed layer carries
its push, on the same positions generation pushes (content tokens: not the first position, padding or specials).
The texts are the ones the user gave, so nothing beyond the topic is read. It is a fine-tuning of at most
``n_latents`` numbers per layer, never of the model: steering vectors trained on examples are the strongest
representation-based steering in AxBench (Wu et al. 2025, ReFT-r1) and in HyperSteer; here the SAE's latents
keep the vector readable and keep it on the SAE's dictionary (a free vector tuned the same way steered no better
at a higher perplexity, docs/results.md, run 11).

The layers are tuned together, as they push together. The result depends on the push's length, so it is tuned
(and cached, :mod:`saealign.steering.aligner`) per topic texts and strength.

On ``saealign eval steer-bench`` (run 11) the tuned mix trades topic for fluency along another line than the
untuned one: well under it at low topic effect (judge perplexity at or below the unsteered text's), on or above it
by the hit rates prompting reaches, and with less diverse text (distinct-2 0.84-0.89x). So it is an option, off by
default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saealign.cache import atomic_write_bytes, cache_dir, hash_json
from saealign.errors import SaealignError
from saealign.residual_stream import content_mask, hidden_from_output, right_pad

TUNING_VERSION = 1

DEFAULT_TUNING: dict[str, float] = {"lr": 0.3, "max_tokens": 48}
"""Adam's step on ``log w`` and how many tokens of each topic text are read (screened on the benchmark, run 11)."""


@dataclass(frozen=True)
class PushedLayer:
    """One layer's push, as tuning sees it."""

    block: nn.Module
    """The decoder block whose output is pushed."""
    decoder: Tensor
    """``[k, d_model]`` float32: the unit decoder rows of the topic's chosen latents at this layer."""
    weights: Tensor
    """``[k]`` float32 > 0: their starting weights (the topic direction's)."""
    length: float
    """The push's length at this layer: ``strength × ρ`` (> 0)."""

    def __post_init__(self) -> None:
        if self.decoder.dim() != 2 or self.weights.shape != (self.decoder.shape[0],) or self.decoder.shape[0] == 0:
            raise SaealignError(f"a tuned push needs [k, d_model] decoder rows and [k] weights, got "
                                f"{tuple(self.decoder.shape)} and {tuple(self.weights.shape)}")
        if not (self.weights > 0).all() or not torch.isfinite(self.weights).all():
            raise SaealignError("a tuned push starts from positive, finite latent weights")
        if not (self.length > 0 and torch.isfinite(torch.tensor(self.length))):
            raise SaealignError(f"a tuned push needs a positive length, got {self.length}")


def unit_mix(decoder: Tensor, weights: Tensor) -> Tensor:
    """``[d_model]`` the unit vector along ``Σ_i weights_i · decoder_i``; one error line where the rows cancel."""
    v = (weights.unsqueeze(1) * decoder).sum(dim=0)
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise SaealignError("the topic's latents cancel out: their decoder directions sum to 0")
    return v / norm


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model's parameters without gradients for the duration (tuning differentiates the push alone)."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def topic_batch(tokenizer: object, texts: Sequence[str], special_ids: set[int], max_tokens: int = 48) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, attention mask, pushed)`` ``[n, seq]`` of the topic texts, right-padded, each cut to ``max_tokens``;
    ``pushed`` marks the positions generation would push (:func:`saealign.residual_stream.content_mask`)."""
    tok: object = tokenizer
    encoded = [list(tok(t, truncation=True, max_length=max_tokens)["input_ids"]) for t in texts]  # type: ignore[operator]
    if not encoded or any(len(e) < 2 for e in encoded):
        raise SaealignError("tuning the push reads each topic text's next tokens: give texts of at least two tokens")
    pad = getattr(tok, "pad_token_id", None)
    ids, mask = right_pad(encoded, int(pad) if pad is not None else 0)
    return ids, mask, content_mask(ids, mask, special_ids)


def topic_loss(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """The mean over texts of each text's mean next-token loss (every text counts once, whatever its length)."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    per_token = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                            reduction="none")
    counts = (targets != -100).sum(dim=1).clamp_min(1)
    return (per_token.sum(dim=1) / counts).mean()


def tune_weights(model: nn.Module, layers: Sequence[PushedLayer], ids: Tensor, mask: Tensor, pushed: Tensor,
                 steps: int, lr: float = 0.3, progress: bool = False) -> tuple[list[Tensor], list[float]]:
    """Each layer's tuned ``[k]`` weights (positive, rescaled so the largest is 1) and the loss before each step and
    after the last (``steps + 1`` values).

    ``steps`` Adam steps on ``log w`` lower :func:`topic_loss` of ``ids`` while every layer's block output gets
    ``length × unit_mix(decoder, w)`` added at the ``pushed`` positions. ``steps=0`` gives the starting weights back,
    rescaled. Deterministic for a given model, input and thread count."""
    if steps < 0:
        raise SaealignError(f"tuning steps must be 0 or more, got {steps}")
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    logs = [torch.log(layer.weights.detach().float() / layer.weights.max()).to(device).requires_grad_(True)
            for layer in layers]
    decoders = [layer.decoder.detach().float().to(device) for layer in layers]
    where = pushed.to(device).unsqueeze(-1)
    current: list[Tensor] = []

    def make_hook(i: int):  # noqa: ANN202 - a closure per layer
        def hook(_mod: nn.Module, _inp: object, output: object) -> object:
            hidden = hidden_from_output(output)
            push = (where * (layers[i].length * current[i])).to(hidden.dtype)
            out = hidden + push
            return out if isinstance(output, Tensor) else (out, *output[1:])  # type: ignore[index]
        return hook

    optimizer = torch.optim.Adam(logs, lr=lr)
    losses: list[float] = []
    handles = [layer.block.register_forward_hook(make_hook(i), prepend=True) for i, layer in enumerate(layers)]
    try:
        with _frozen(model), torch.enable_grad():
            for step in tqdm(range(steps + 1), desc="tuning the push", unit="step", disable=not progress):
                current[:] = [unit_mix(d, torch.exp(w)) for d, w in zip(decoders, logs, strict=True)]
                if step == steps:  # the loss after the last step: no gradient needed
                    with torch.no_grad():
                        losses.append(float(topic_loss(model, ids, mask)))
                    break
                loss = topic_loss(model, ids, mask)
                losses.append(float(loss.detach()))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    if not all(torch.isfinite(torch.tensor(losses))):
        raise SaealignError("tuning the push gave a non-finite loss: steer with tune_steps=0")
    tuned = [torch.exp(w.detach() - w.detach().max()).cpu() for w in logs]
    return tuned, losses


def load_or_tune(model: nn.Module, layers: Sequence[PushedLayer], tokenizer: object, special_ids: set[int],
                 texts: Sequence[str], steps: int, key: dict[str, object], folder: Path | None = None,
                 progress: bool = False) -> list[Tensor]:
    """Each layer's tuned weights (:func:`tune_weights` on ``texts``), from the cache or tuned and saved.

    ``key`` names what the layers are (model, SAEs, layers, chosen latents, strengths); the cache file's name
    hashes it with the texts, the steps and :data:`DEFAULT_TUNING`. A corrupt or foreign file is tuned anew and
    overwritten."""
    full = {**key, "layers": [{"latents": len(layer.weights), "length": round(layer.length, 6),
                               "weights": [round(float(w), 6) for w in layer.weights]} for layer in layers],
            "texts": list(texts), "steps": steps, "tuning": DEFAULT_TUNING, "v": TUNING_VERSION}
    path = (folder or cache_dir() / "steering") / f"tuned-{hash_json(full)[:16]}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            weights = [torch.tensor(w, dtype=torch.float32) for w in saved["weights"]]
            if (saved.get("key") == full and len(weights) == len(layers)
                    and all(w.shape == layer.weights.shape and torch.isfinite(w).all() and (w > 0).all()
                            for w, layer in zip(weights, layers, strict=True))):
                return weights
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            pass
    ids, mask, pushed = topic_batch(tokenizer, texts, special_ids, int(DEFAULT_TUNING["max_tokens"]))
    weights, _ = tune_weights(model, layers, ids, mask, pushed, steps, float(DEFAULT_TUNING["lr"]), progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"key": full, "weights": [w.tolist() for w in weights]}).encode())
    return weights
