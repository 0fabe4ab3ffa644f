"""The training data of an SAE: residual-stream activations streamed from a model, in shuffle-sized chunks.

Activations come from a partial forward (bf16) that stops at the deepest requested layer, so one pass
feeds SAEs for several layers. The first position and special tokens are left out: the first
position's norm is 10-100x the rest and would dominate the loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from saealign.models import LoadedModel
from saealign.residual_stream import content_mask, residuals_at_layers, right_pad, special_token_ids
from saealign.sae.train_config import TrainConfig


def activation_stream(
    lm: LoadedModel, texts: list[str], cfg: TrainConfig, start_text: int = 0
) -> Iterator[tuple[dict[int, Tensor], int]]:
    """Yield ``({layer: [n_tokens, d_model] float32}, texts_consumed)`` in chunks of ~``buffer_tokens``.

    Texts are read in order from ``start_text``; within a chunk, forwards are batched by length to
    avoid padding waste. Chunks end on text boundaries, so ``texts_consumed`` is an exact resume point.
    """
    tok = lm.tokenizer
    special = special_token_ids(tok)
    layers = list(cfg.layers)
    i = start_text
    while i < len(texts):
        parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        n_tok = 0
        while i < len(texts) and n_tok < cfg.buffer_tokens:
            # Group the next texts by length: a few hundred at a time, sorted, cut into forward batches.
            group = texts[i : i + cfg.text_batch * 8]
            enc = [tok(t, truncation=True, max_length=cfg.max_seq_len)["input_ids"] for t in group]  # type: ignore[operator]
            order = sorted(range(len(enc)), key=lambda j: len(enc[j]))
            for b in range(0, len(order), cfg.text_batch):
                rows = [enc[j] for j in order[b : b + cfg.text_batch]]
                ids, mask = right_pad(rows, int(tok.pad_token_id))  # type: ignore[attr-defined]
                keep = content_mask(ids, mask, special)
                acts = residuals_at_layers(lm.model, layers, ids, mask)
                for layer in layers:
                    parts[layer].append(acts[layer][keep].float())
                n_tok += int(keep.sum())
            i += len(group)
        yield {layer: torch.cat(parts[layer]) for layer in layers}, i
