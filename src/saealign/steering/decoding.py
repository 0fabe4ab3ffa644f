"""The sampling loop behind :mod:`saealign.steering.aligner`: one batch, one step at a time, with a KV cache.

Written by hand rather than through ``model.generate`` so that

- every row keeps its own random stream (:func:`row_generator`): a prompt samples the same text
  alone or in any batch, and when other rows stop early;
- the steering hook is attached only for the duration of each forward call, so a stream left half
  read never leaves a hook on the model;
- the prompt pass can tell the hook which positions to leave unedited (padding and each row's
  first position, :attr:`SteeringHook.keep`), and each step hands back the contamination of the
  position that predicted the new token;
- text comes back a piece per token (:class:`Detokenizer`), ready to stream.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from saealign.errors import SaealignError
from saealign.steering.hook import SteeringHook
from saealign.steering.spec import GenerationSpec


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen."""

    max_new_tokens: int = 64
    """Tokens generated per row at most (a row stops earlier at an end-of-sequence token)."""
    top_k: int = 5
    """Sample among the ``top_k`` most likely tokens (the paper: 5)."""
    temperature: float = 1.0
    """Divides the logits before the softmax; ignored when ``greedy``."""
    greedy: bool = False
    """Take the most likely token (deterministic; ``top_k``, ``temperature`` and seeds are unused)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SaealignError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.top_k < 1:
            raise SaealignError(f"top_k must be at least 1, got {self.top_k}")
        if not self.greedy and not self.temperature > 0:
            raise SaealignError(f"temperature must be > 0, got {self.temperature}: use greedy=True for argmax")

    @classmethod
    def of(cls, spec: GenerationSpec) -> Sampling:
        """The sampling fields of a generation spec."""
        return cls(spec.max_new_tokens, spec.top_k, spec.heat, spec.greedy)


class Step(NamedTuple):
    """What one decoding step produced for every row of the batch (``[batch]`` tensors)."""

    step: int
    """0-based position of these tokens among the generated ones."""
    token_ids: Tensor
    """int64 new token per row; the pad id for rows finished before this step."""
    active: Tensor
    """bool: the row produced a token at this step (it had not finished before)."""
    finished: Tensor
    """bool: the row is done after this step (end-of-sequence token or length reached)."""
    contamination: Tensor | None
    """float32 contamination of the position that predicted the token; None when nothing is recorded."""
    n_changed: Tensor | None
    """int64 latents changed at that position; None when nothing is recorded."""


class Detokenizer:
    """Turns one row's growing token ids into text pieces that concatenate to the decoded text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int, last: bool) -> str:
        """The text ``token_id`` adds; ``last`` flushes what an incomplete character held back."""
        self.ids.append(token_id)
        # Decoding the whole row each time (not the token alone) keeps word-initial spaces and
        # multi-byte characters split over tokens intact.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not last:
            return ""  # an incomplete multi-byte character: wait for its other bytes
        common = len(os.path.commonprefix([text, self.emitted]))
        piece = text[common:]  # common < len(emitted) only where the tokenizer rewrote earlier text
        self.emitted = text
        return piece


def row_generator(seed: int, text: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, text)`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``[batch, longest]`` int64, padded on the left.

    Left padding puts every row's last prompt token in the last column, where the next token is read.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def slot_positions(rows: list[list[int]], slots: Sequence[int | None], width: int) -> Tensor:
    """bool ``[batch, width]``: each row's slot (an index into its own ids) where :func:`left_pad` puts it."""
    if len(slots) != len(rows):
        raise SaealignError(f"{len(slots)} slot positions for {len(rows)} rows: give one per row (None: no slot)")
    out = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, at) in enumerate(zip(rows, slots, strict=True)):
        if at is not None:
            if not 0 <= at < len(r):
                raise SaealignError(f"row {i}'s slot at {at} lies outside its {len(r)} prompt tokens")
            out[i, width - len(r) + at] = True
    return out


def positions(mask: Tensor) -> Tensor:
    """Position ids from an attention mask ``[batch, seq]``: 0 at each row's first real token.

    Padding gets 0 (clamped), a value never attended to; a row's real tokens get the same
    positions as when the row runs alone, which keeps rotary embeddings batch-independent.
    """
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def sample_next(logits: Tensor, sampling: Sampling, generators: list[torch.Generator], rows: list[int]) -> Tensor:
    """Next token of each row in ``rows``: ``logits [batch, vocab] -> int64 [len(rows)]`` on the CPU.

    Top-k sampling draws on the CPU with the row's own generator, so the draw does not depend on
    the device or on the other rows.
    """
    picked = logits[rows].float()
    if sampling.greedy:
        return picked.argmax(dim=-1).cpu()
    values, indices = picked.topk(min(sampling.top_k, picked.shape[-1]), dim=-1)
    probs = torch.softmax(values / sampling.temperature, dim=-1).cpu()
    indices = indices.cpu()
    out = torch.empty(len(rows), dtype=torch.long)
    for j, row in enumerate(rows):
        choice = torch.multinomial(probs[j], 1, generator=generators[row])
        out[j] = indices[j, choice]
    return out


def _new_cache(model: nn.Module) -> object:
    from transformers import DynamicCache

    try:  # transformers 5: the config tells which layers use a sliding window (Gemma 3)
        return DynamicCache(config=model.config)  # type: ignore[arg-type]
    except TypeError:
        return DynamicCache()


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.x renamed ``past_key_values`` to ``cache``; 4.x only knows the old name
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_steps(
    model: nn.Module,
    rows: list[list[int]],
    sampling: Sampling,
    generators: list[torch.Generator],
    pad_id: int,
    eos_ids: set[int],
    hook: SteeringHook | None = None,
    layer: nn.Module | None = None,
    steer_prompt: bool = True,
    unedited_ids: set[int] | None = None,
    prompt_boost: float = 1.0,
    companions: Sequence[tuple[SteeringHook, nn.Module]] = (),
    slots: Sequence[int | None] = (),
) -> Iterator[Step]:
    """Generate from the token-id ``rows`` (one prompt each), yielding one :class:`Step` per new token.

    ``hook`` (attached to ``layer`` around each forward call) steers every position; generated token
    j is predicted at the position before it, so the step reports the contamination recorded there:
    the last prompt position for j = 0, generated position j − 1 afterwards. Stops when every row is
    finished; finished rows are fed the pad id, which only they see. Positions holding one of
    ``unedited_ids`` (the tokenizer's special tokens: chat markers, a fed-back end of turn) pass through
    unedited, as the SAE's training data and the reference index leave them out. ``prompt_boost`` multiplies
    an additive method's push in the prompt pass (:attr:`saealign.steering.spec.GenerationSpec.prompt_boost`).
    ``companions`` (hook, block) pairs push at further layers alongside ``hook``, on the same positions and with the
    same prompt boost (:attr:`saealign.steering.plan.Plan.companions`). ``slots`` gives, per row, the index in its
    ``rows`` ids of the concept slot's placeholder (None: the row has none; empty: no row has), where the prompt pass
    adds each hook's :attr:`~saealign.steering.hook.SteeringHook.slot_vectors` (:mod:`saealign.steering.slot`).
    """
    if companions and hook is None:
        raise SaealignError("companion pushes steer beside a main hook: pass hook= too")
    if hook is not None and layer is None:
        raise SaealignError("decode_steps needs the layer module to attach the steering hook to")
    device = next(model.parameters()).device
    ids, mask = left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    batch = len(rows)
    done = torch.zeros(batch, dtype=torch.bool)
    cache, cache_name = _new_cache(model), _cache_kwarg(model)
    # The prompt pass leaves padding and each row's first real position unedited (see SteeringHook.keep).
    keep: Tensor | None = (mask == 0) | (mask.cumsum(dim=1) == 1)
    if not steer_prompt:  # only the positions that predict new tokens: the last prompt position, then generated ones
        keep = torch.ones_like(mask, dtype=torch.bool)
        keep[:, -1] = False  # left padding: every row's last prompt token sits in the last column
    specials = torch.tensor(sorted(unedited_ids or ()), dtype=torch.long, device=device)

    def with_specials(keep_now: Tensor | None, fed: Tensor) -> Tensor | None:
        if not len(specials):
            return keep_now
        special = torch.isin(fed, specials)
        if keep_now is None:
            return special if bool(special.any()) else None
        return keep_now | special

    keep = with_specials(keep, ids)
    slot_mask = slot_positions(rows, slots, ids.shape[1]).to(device) if any(i is not None for i in slots) else None
    feed, pos = ids, positions(mask)
    for step in range(sampling.max_new_tokens):
        logits, contamination, n_changed = _forward(
            model, feed, mask, pos, {cache_name: cache}, hook, layer, keep, prompt_boost if step == 0 else 1.0,
            companions, slot_mask,
        )
        keep = slot_mask = None
        active = ~done
        rows_now = active.nonzero().flatten().tolist()
        tokens = torch.full((batch,), pad_id, dtype=torch.long)
        tokens[rows_now] = sample_next(logits, sampling, generators, rows_now)
        stop = torch.tensor([int(t) in eos_ids for t in tokens.tolist()]) & active
        done = done | stop | (step + 1 == sampling.max_new_tokens)
        yield Step(step, tokens, active, done.clone(), contamination, n_changed)
        if bool(done.all()):
            return
        feed = tokens.unsqueeze(1).to(device)
        keep = with_specials(None, feed)
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        pos = positions(mask)[:, -1:]


def _forward(
    model: nn.Module,
    feed: Tensor,
    mask: Tensor,
    pos: Tensor,
    cache: dict[str, object],
    hook: SteeringHook | None,
    layer: nn.Module | None,
    keep: Tensor | None,
    push_scale: float = 1.0,
    companions: Sequence[tuple[SteeringHook, nn.Module]] = (),
    slot_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One forward call: ``(last-position logits [batch, vocab], contamination [batch] | None, n_changed | None)``."""
    if hook is None:
        out = model(input_ids=feed, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **cache)
        return out.logits[:, -1], None, None
    assert layer is not None
    hook.clear()
    attached = [(hook, layer), *companions]
    handles = []
    try:
        for h, block in attached:
            h.keep = keep
            h.push_scale = push_scale
            h.slot_mask = slot_mask
            handles.append(h.register(block))
        out = model(input_ids=feed, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **cache)
    finally:
        for handle in handles:
            handle.remove()
        for h, _ in attached:
            h.keep = None
            h.push_scale = 1.0
            h.slot_mask = None
    if not hook.record:
        return out.logits[:, -1], None, None
    return out.logits[:, -1], hook.contamination[-1][:, -1].cpu(), hook.n_changed[-1][:, -1].cpu()
