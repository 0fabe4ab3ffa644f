"""Train TopK SAEs on a model's residual stream (Gao et al. 2024, as in EleutherAI's sparsify).

Recipe: unit-norm decoder rows (gradient parallel to them removed before each step), encoder
initialised as the decoder's transpose, ``b_dec`` initialised at the mean of the first activation
buffer, FVU loss plus AuxK loss (the dead latents' top ``d_in/2`` pre-activations reconstruct the
residual error, weight 1/32), Adam with linear warm-up and a linear decay over the last 20 % of steps.

Activations stream from a partial forward (bf16) that stops at the deepest requested layer, so one
pass feeds SAEs for several layers. The first position and special tokens are left out: the first
position's norm is 10-100x the rest and would dominate the loss. A checkpoint is written after each
activation buffer (SAE + optimiser + counters, as safetensors + JSON: never a pickle), so a killed
run resumes exactly where it stopped.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saealign.cache import atomic_write_json, check_replaceable
from saealign.errors import SaealignError
from saealign.models import LoadedModel, content_mask, residuals_at_layers, special_token_ids
from saealign.sae.autoencoder import SAE, SAEConfig
from saealign.sae.checkpoint import load_checkpoint, save_checkpoint
from saealign.sae.quality import SAEQuality, evaluate_sae


@dataclass(frozen=True)
class TrainConfig:
    """How to train TopK SAEs (one per layer) on a model's residual stream."""

    layers: tuple[int, ...] = (6,)
    """Blocks whose output each SAE reads."""
    expansion: int = 8
    """d_sae = expansion x d_model."""
    k: int = 32
    """Active latents per token."""
    tokens: int = 2_000_000
    """Training tokens (after leaving out first positions and special tokens)."""
    batch_tokens: int = 4096
    """Tokens per optimiser step."""
    buffer_tokens: int = 65_536
    """Activations shuffled together before being cut into batches (a checkpoint after each)."""
    max_seq_len: int = 128
    """Texts are truncated to this many tokens."""
    text_batch: int = 32
    """Texts per forward pass."""
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(d_sae / 2**14), the scaling law of Gao et al."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    decay_fraction: float = 0.2
    """Final fraction of steps with linear decay to zero."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 250_000
    """A latent that has not fired for this many tokens counts as dead (AuxK revives it)."""
    seed: int = 0
    """Seed for text order, buffer shuffles and initialisation."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise SaealignError("give at least one layer to train an SAE for")
        if self.tokens < self.batch_tokens:
            raise SaealignError(f"--tokens ({self.tokens}) must be at least one batch ({self.batch_tokens})")
        if self.k <= 0 or self.expansion <= 0:
            raise SaealignError("k and expansion must be positive")
        if self.buffer_tokens < self.batch_tokens:
            raise SaealignError(f"buffer_tokens ({self.buffer_tokens}) must hold at least one batch ({self.batch_tokens})")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens


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
                width = max(len(r) for r in rows)
                ids = torch.full((len(rows), width), int(tok.pad_token_id))  # type: ignore[attr-defined]
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, row in enumerate(rows):
                    ids[r, : len(row)] = torch.tensor(row)
                    mask[r, : len(row)] = 1
                keep = content_mask(ids, mask, special)
                acts = residuals_at_layers(lm.model, layers, ids, mask)
                for layer in layers:
                    parts[layer].append(acts[layer][keep].float())
                n_tok += int(keep.sum())
            i += len(group)
        yield {layer: torch.cat(parts[layer]) for layer in layers}, i


class TopKTrainer:
    """One TopK SAE being trained (fp32 master weights).

    The encoder is kept as ``W_encT [d_sae, d_in]`` (rows = latents, like the decoder) during training.
    """

    def __init__(self, d_in: int, cfg: TrainConfig, layer: int, model_name: str, generator: torch.Generator) -> None:
        d_sae = d_in * cfg.expansion
        self.cfg = cfg
        self.layer = layer
        self.model_name = model_name
        self.d_in, self.d_sae = d_in, d_sae
        w_dec = torch.randn(d_sae, d_in, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_encT = torch.nn.Parameter(w_dec.clone())  # tied initialisation: encoder = decoder transpose
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(w_dec)
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.params = [self.W_encT, self.b_enc, self.W_dec, self.b_dec]
        self.lr = lr_for(d_sae, cfg)
        self.opt = torch.optim.Adam(self.params, lr=self.lr, betas=(0.9, 0.999), eps=6.25e-10)
        self.step = 0
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
        self.initialised = False
        self.last: dict[str, float] = {}

    def to_sae(self) -> SAE:
        cfg = SAEConfig(
            d_in=self.d_in, d_sae=self.d_sae, activation="topk", k=self.cfg.k, apply_b_dec_to_input=True,
            model_name=self.model_name, hook_layer=self.layer,
        )
        sae = SAE(cfg, W_enc=self.W_encT.detach().T.contiguous(), b_enc=self.b_enc.detach(),
                  W_dec=self.W_dec.detach(), b_dec=self.b_dec.detach())
        return sae.requires_grad_(False)

    def _lr_at(self, step: int) -> float:
        total = self.cfg.steps
        if step < self.cfg.warmup_steps:
            return self.lr * (step + 1) / self.cfg.warmup_steps
        decay_start = int(total * (1 - self.cfg.decay_fraction))
        if step >= decay_start:
            return self.lr * max(0.0, (total - step) / max(1, total - decay_start))
        return self.lr

    def train_batch(self, x: Tensor) -> None:
        """One optimiser step on ``x [batch_tokens, d_in]`` (fp32)."""
        k = self.cfg.k
        if not self.initialised:
            with torch.no_grad():
                self.b_dec.copy_(x.mean(dim=0))
            self.initialised = True
        for group in self.opt.param_groups:
            group["lr"] = self._lr_at(self.step)
        xc = x - self.b_dec
        pre = xc @ self.W_encT.T + self.b_enc  # [B, d_sae]
        top = pre.topk(k, dim=-1)
        top_idx, vals = top.indices, torch.relu(top.values)
        # Dense decode of the scattered activations: BLAS matmuls beat gathering k decoder rows per token
        # (a gather moves batch * k * d_in floats through memory; measured 2-3x slower on 2 CPU cores).
        acts = torch.zeros_like(pre).scatter(1, top_idx, vals)
        recon = acts @ self.W_dec + self.b_dec
        err = x - recon
        total_var = (x - x.mean(dim=0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var

        fired = torch.zeros(self.d_sae, dtype=torch.bool)
        fired[top_idx[vals.detach() > 0]] = True
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired[fired] = 0
        dead = self.tokens_since_fired >= self.cfg.dead_tokens
        n_dead = int(dead.sum())
        auxk = torch.zeros(())
        if n_dead > 0:
            # AuxK: the dead latents' top pre-activations try to explain the residual error.
            dead_idx = dead.nonzero().squeeze(1)
            pre_dead = xc @ self.W_encT[dead_idx].T + self.b_enc[dead_idx]  # [B, n_dead]
            aux = pre_dead.topk(min(self.d_in // 2, n_dead), dim=-1)
            aux_acts = torch.zeros_like(pre_dead).scatter(1, aux.indices, torch.relu(aux.values))
            aux_recon = aux_acts @ self.W_dec[dead_idx]
            e = err.detach()
            auxk = torch.nan_to_num((e - aux_recon).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum(), nan=0.0)
        loss = fvu + self.cfg.auxk_alpha * auxk
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # Keep decoder rows unit-norm: drop the gradient component that would change their norm.
            w, g = self.W_dec, self.W_dec.grad
            if g is not None:
                g -= (g * w).sum(dim=1, keepdim=True) * w
        self.opt.step()
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        self.step += 1
        self.last = {"fvu": fvu.item(), "auxk": auxk.item(), "dead": n_dead / self.d_sae}

    # -- checkpointing --------------------------------------------------------------------------
    def state(self) -> dict[str, object]:
        return {
            "params": [p.detach().clone() for p in self.params],
            "opt": self.opt.state_dict(),
            "step": self.step,
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "initialised": self.initialised,
        }

    def load_state(self, state: dict[str, object]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):  # type: ignore[call-overload]
                p.copy_(saved)
        self.opt.load_state_dict(state["opt"])  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[call-overload]
        self.tokens_since_fired = state["tokens_since_fired"]  # type: ignore[assignment]
        self.initialised = bool(state["initialised"])


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


def lr_for(d_sae: int, cfg: TrainConfig) -> float:
    """The configured learning rate, or Gao et al.'s scaling ``2e-4 / sqrt(d_sae / 2**14)``."""
    return cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)
