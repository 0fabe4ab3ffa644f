"""Layer L of a causal LM: finding its decoder blocks and reading the residual stream after one of them.

"Layer L" everywhere in saealign means the residual stream *after* decoder block L (0-based), the
SAELens hook ``blocks.L.hook_resid_post``, i.e. ``hidden_states[L + 1]`` of a HF forward pass.
Also here: which token positions count (:func:`content_mask`, :func:`special_token_ids`,
:func:`massive_positions`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from saealign.errors import SaealignError

# Attribute paths to the decoder-block list, by architecture family. Order matters: multimodal
# Gemma 3 wraps the text model one level deeper.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma 2/3 (CausalLM)
    "model.language_model.layers",  # Gemma 3 ForConditionalGeneration
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a HF causal LM (Llama, Gemma 2/3, GPT-2, GPT-NeoX, Qwen2, Mistral...)."""
    for dotted in _LAYER_PATHS:
        obj: object = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise SaealignError(f"cannot find the decoder blocks of {type(model).__name__}: supported are Llama, Gemma, GPT-2, GPT-NeoX, Qwen2, Mistral")


def layer_module(model: nn.Module, layer: int) -> nn.Module:
    """The block whose output is the residual stream after block ``layer`` (0-based; negatives count back)."""
    layers = decoder_layers(model)
    n = len(layers)
    if not -n <= layer < n:
        raise SaealignError(f"layer {layer} is out of range: this model has {n} blocks (use 0..{n - 1})")
    return layers[layer]


def hidden_from_output(output: object) -> Tensor:
    """A decoder block's hidden states, whether it returns a Tensor or a tuple (HF versions differ)."""
    return output if isinstance(output, Tensor) else output[0]  # type: ignore[index]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once layer L is computed (partial forward)."""


@torch.inference_mode()
def residuals_at_layers(
    model: nn.Module, layers: list[int], input_ids: Tensor, attention_mask: Tensor | None = None
) -> dict[int, Tensor]:
    """Residual streams after several blocks from one partial forward: ``{L: [b, s, d_model]}``.

    The pass stops right after the deepest requested block, so layer 6 of 30 costs ~1/5 of a full
    pass, and several layers cost no more than the deepest one.
    """
    blocks = decoder_layers(model)
    for layer in layers:
        layer_module(model, layer)  # range check with a clear message
    wanted = sorted({layer % len(blocks) for layer in layers})
    store: dict[int, Tensor] = {}
    deepest = wanted[-1]

    def make_hook(index: int):  # noqa: ANN202 - a closure per block
        def hook(_mod: nn.Module, _inp: object, out: object) -> None:
            store[index] = hidden_from_output(out)
            if index == deepest:
                raise _StopForward

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in wanted]
    try:
        with contextlib.suppress(_StopForward):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(store) != len(wanted):
        raise RuntimeError("the layer hooks did not fire: the model skipped its decoder blocks")
    return {layer: store[layer % len(blocks)] for layer in layers}


def residuals_at(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Residual stream after block ``layer``: ``input_ids [b, s] -> [b, s, d_model]`` (partial forward)."""
    return residuals_at_layers(model, [layer], input_ids, attention_mask)[layer]


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``[batch, longest]`` int64, padded on the right (what the statistics readers
    feed: a row's positions keep their order from 0; :func:`content_mask` handles either side)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def special_token_ids(tokenizer: object) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS/EOS/PAD/chat markers): excluded from SAE data and summaries."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    return {int(i) for i in ids if i is not None}


def content_mask(input_ids: Tensor, attention_mask: Tensor, special_ids: set[int]) -> Tensor:
    """Positions whose activations count: real tokens, not special, not the first real position.

    The first position's residual norm is 10-100x the others in most LMs (attention sink), so it is
    left out of SAE training data and of prompt summaries. Works for left or right padding.
    ``input_ids, attention_mask: [b, s] -> bool [b, s]``.
    """
    mask = attention_mask.bool()
    first = mask.int().cumsum(dim=1) == 1
    mask = mask & ~first
    if special_ids:
        special = torch.isin(input_ids, torch.tensor(sorted(special_ids), device=input_ids.device))
        mask = mask & ~special
    return mask


MASSIVE_FACTOR = 10.0
"""A position whose residual norm exceeds this many times the median of the batch's counted positions is a
massive activation (an attention sink): typical norms sit within 2x of the median, sinks 100x above it."""


def massive_positions(hidden: Tensor, keep: Tensor, factor: float = MASSIVE_FACTOR) -> Tensor:
    """Counted positions (``keep``) whose residual norm is more than ``factor`` x the median of those positions.

    :func:`content_mask` leaves out the first position, the usual attention sink, but some texts grow a
    second one later on: SmolLM2 gives "let me know ..." a norm of ~23,000 on its second token, where
    content tokens read ~190 at layer 15. The SAE codes such a residual with latents at thousands, so a
    single sink among a few short texts outweighs everything the texts are about in a mean activation.
    ``hidden [b, s, d], keep bool [b, s] -> bool [b, s]`` (False everywhere when nothing is kept).
    """
    norms = hidden.float().norm(dim=-1)
    if not bool(keep.any()):
        return torch.zeros_like(keep)
    median = norms[keep].median()
    return keep & (norms > factor * median)


@torch.inference_mode()
def content_residuals(model: nn.Module, tokenizer: Any, layers: list[int], texts: Sequence[str], max_seq_len: int = 128,
                      batch_size: int = 32, by_length: bool = False) -> Iterator[dict[int, Tensor]]:
    """Per batch of ``texts``, each layer's residuals at the content positions: ``{L: [n, d]}``. Batches follow the
    order given, or with ``by_length`` the texts' token counts (so each pads little; for sums, where order is moot).

    One partial forward per batch reads every layer. Content = :func:`content_mask` less each layer's own later
    attention sinks (:func:`massive_positions`): what the mean activations and mean residuals are taken over."""
    special = special_token_ids(tokenizer)
    device = next(model.parameters()).device
    encoded = [tokenizer(t, truncation=True, max_length=max_seq_len)["input_ids"] for t in texts]
    if by_length:
        encoded.sort(key=len)
    for b in range(0, len(encoded), batch_size):
        ids, mask = right_pad(encoded[b:b + batch_size], int(tokenizer.pad_token_id))
        keep = content_mask(ids, mask, special).to(device)
        hidden = residuals_at_layers(model, layers, ids.to(device), mask.to(device))
        yield {layer: hidden[layer][keep & ~massive_positions(hidden[layer], keep)] for layer in layers}
