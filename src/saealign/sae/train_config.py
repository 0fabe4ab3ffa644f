"""How TopK SAEs are trained: :class:`TrainConfig` (validated once, recorded in every saved SAE and
checkpoint) and the learning rate it implies."""

from __future__ import annotations

import math
from dataclasses import dataclass

from saealign.errors import SaealignError


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


def lr_for(d_sae: int, cfg: TrainConfig) -> float:
    """The configured learning rate, or Gao et al.'s scaling ``2e-4 / sqrt(d_sae / 2**14)``."""
    return cfg.lr if cfg.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)
