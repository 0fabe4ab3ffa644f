"""Train TopK SAEs on a model's residual stream: one run feeds an SAE per layer, then each is evaluated
on held-out texts and saved.

The run owns the order of texts (seeded), the token budget and resuming: a checkpoint is written after
each activation buffer (SAE + optimiser + counters, as safetensors + JSON: never a pickle), so a killed
run resumes exactly where it stopped. The data side is :mod:`saealign.sae.activations`, one optimiser
step is :mod:`saealign.sae.topk_trainer`, the options are :mod:`saealign.sae.train_config`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saealign.cache import atomic_write_json, check_replaceable
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.sae.activations import activation_stream
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.sae.checkpoint import load_checkpoint, save_checkpoint
from saealign.sae.quality import SAEQuality, evaluate_sae
from saealign.sae.topk_trainer import TopKTrainer
from saealign.sae.train_config import TrainConfig, lr_for


def _save_checkpoint(folder: Path, trainers: list[TopKTrainer], texts_consumed: int, tokens_seen: int,
                     cfg: TrainConfig, rng_state: Tensor) -> None:
    save_checkpoint(folder, {
        "trainers": {t.layer: t.state() for t in trainers},
        "texts_consumed": texts_consumed,
        "tokens_seen": tokens_seen,
        "config": asdict(cfg),
        "rng": rng_state,
    })


def train_saes(
    lm: LoadedModel,
    texts: list[str],
    cfg: TrainConfig,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
) -> tuple[dict[int, SAE], dict[str, float]]:
    """Train one TopK SAE per layer of ``cfg.layers`` on ``texts``; returns ({layer: SAE}, run facts).

    ``texts`` are used in a seeded random order until ``cfg.tokens`` tokens are seen (cycling if the
    corpus is smaller). With ``checkpoint_dir``, a run with the same config resumes from its last buffer.
    """
    if not texts:
        raise SaealignError("the training corpus is empty: give texts to train the SAE on")
    for layer in cfg.layers:
        if not 0 <= layer < lm.n_layers:
            raise SaealignError(f"layer {layer} is out of range: this model has {lm.n_layers} blocks (use 0..{lm.n_layers - 1})")
    d_in = lm.d_model
    gen = torch.Generator().manual_seed(cfg.seed)
    trainers = [TopKTrainer(d_in, cfg, layer, lm.name, gen) for layer in cfg.layers]
    order = list(range(len(texts)))
    random.Random(cfg.seed).shuffle(order)
    # Enough passes over the corpus to reach the token budget (rarely more than one).
    epochs = max(1, math.ceil(cfg.tokens / max(1, 8 * len(texts))))
    ordered = [texts[j] for _ in range(epochs) for j in order]

    start_text, tokens_seen = 0, 0
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    state = None
    if checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir)
        check_replaceable(checkpoint_dir)  # a folder we may not write is refused before any training
    if state is not None:
        if state["config"] != asdict(cfg):
            raise SaealignError(
                f"checkpoint in {checkpoint_dir} was made with another training config: delete it or pass the same options"
            )
        for t in trainers:
            t.load_state(state["trainers"][t.layer])
        start_text, tokens_seen = state["texts_consumed"], state["tokens_seen"]
        shuffle_gen.set_state(state["rng"])

    started = time.perf_counter()
    bar = tqdm(total=cfg.steps * cfg.batch_tokens, initial=tokens_seen, unit="tok", unit_scale=True,
               desc=f"train SAE L{','.join(map(str, cfg.layers))}", disable=not progress)
    done = trainers[0].step >= cfg.steps
    stream = activation_stream(lm, ordered, cfg, start_text) if not done else iter(())
    for chunk, consumed in stream:
        perm = torch.randperm(next(iter(chunk.values())).shape[0], generator=shuffle_gen)
        n_batches = len(perm) // cfg.batch_tokens
        for b in range(n_batches):
            idx = perm[b * cfg.batch_tokens : (b + 1) * cfg.batch_tokens]
            for t in trainers:
                t.train_batch(chunk[t.layer][idx])
            tokens_seen += cfg.batch_tokens
            bar.update(cfg.batch_tokens)
            bar.set_postfix({f"fvu{t.layer}": f"{t.last['fvu']:.3f}" for t in trainers})
            if trainers[0].step >= cfg.steps:
                break
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, trainers, consumed, tokens_seen, cfg, shuffle_gen.get_state())
        if trainers[0].step >= cfg.steps:
            break
    bar.close()
    if trainers[0].step < cfg.steps:
        raise SaealignError(f"the corpus ran out after {tokens_seen} tokens: give more texts or lower --tokens")
    seconds = time.perf_counter() - started
    saes = {t.layer: t.to_sae() for t in trainers}
    facts = {"train_seconds": seconds, "tokens_seen": float(tokens_seen), "steps": float(cfg.steps)}
    return saes, facts


def train_and_save(
    lm: LoadedModel,
    train_texts: list[str],
    eval_texts: list[str],
    cfg: TrainConfig,
    out_dir: Path,
    recipe: dict[str, object],
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    save_dtype: torch.dtype = torch.bfloat16,
) -> dict[int, SAEQuality]:
    """Train, evaluate on held-out texts and save each SAE to ``out_dir/layer_L`` (SAELens layout).

    The saved ``cfg.json`` records the recipe (corpus, tokens, seed, steps) and the held-out figures.
    """
    for layer in cfg.layers:
        check_replaceable(out_dir / f"layer_{layer}")  # refused now, not after the training
    saes, facts = train_saes(lm, train_texts, cfg, checkpoint_dir, progress)
    qualities: dict[int, SAEQuality] = {}
    for layer, sae in saes.items():
        stored = SAE(sae.cfg, **{k: v.to(save_dtype) for k, v in sae.state_for_saving().items()})
        quality = evaluate_sae(lm, stored, layer, eval_texts, max_seq_len=cfg.max_seq_len, progress=progress)
        qualities[layer] = quality
        meta = {
            "recipe": {**recipe, **asdict(cfg), "layers": list(cfg.layers), "lr_used": lr_for(sae.d_sae, cfg)},
            "training": facts,
            "held_out": asdict(quality),
        }
        final = SAE(
            SAEConfig(**{**asdict(sae.cfg), "metadata": meta}),
            **{k: v.to(save_dtype) for k, v in sae.state_for_saving().items()},
        )
        final.save(out_dir / f"layer_{layer}")
    atomic_write_json(out_dir / "training.json", {"facts": facts, "held_out": {str(k): asdict(v) for k, v in qualities.items()}})
    return qualities
