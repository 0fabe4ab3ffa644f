"""Fine-tuning baselines (the paper's "FT" rows): full fine-tuning or LoRA of the LM on the topic texts.

Standard recipe, as in HF ``Trainer`` defaults: causal-LM loss on each text (truncated to ``max_length``
tokens, right-padded, padding ignored by the loss), AdamW, linear warm-up then linear decay to zero,
gradient norm clipped at 1, texts reshuffled each epoch from a seeded generator. Training runs in float32
whatever the model's dtype (bf16 Adam updates lose most of a small learning rate), and the result is cast
back. LoRA adapters are merged into the weights at the end, so the tuned model is a plain transformers
model with the base architecture that the rest of saealign (generation, evaluation) uses unchanged.

The input model is never touched: training works on a deep copy.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saealign.cache import hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.residual_stream import right_pad

Method = Literal["full", "lora"]
_DEFAULT_LR: dict[str, float] = {"full": 5e-5, "lora": 2e-4}


@dataclass(frozen=True)
class FineTuneConfig:
    """How to fine-tune a causal LM on a list of texts."""

    method: Method = "full"
    """``full``: every weight trains; ``lora``: low-rank adapters on ``lora_targets``, merged at the end."""
    epochs: int = 3
    """Passes over the texts."""
    lr: float | None = None
    """AdamW peak learning rate; None = the method's default (5e-5 full, 2e-4 LoRA). 0 is allowed (no-op run)."""
    batch_size: int = 8
    """Texts per optimiser step."""
    max_length: int = 128
    """Texts are truncated to this many tokens (BOS included when the tokenizer adds one)."""
    warmup_ratio: float = 0.1
    """Fraction of all steps spent warming the learning rate up linearly; it then decays linearly to 0."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = 1.0
    """Gradient norm clip (None: no clipping)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scale numerator (the update is ``alpha / r * B @ A``)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    lora_targets: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))
    """Names (last dotted component) of the linear modules that get adapters."""
    seed: int = 0
    """Seed for the text order, LoRA initialisation and dropout."""

    def __post_init__(self) -> None:
        if self.method not in _DEFAULT_LR:
            raise SaealignError(f"unknown fine-tuning method {self.method!r}: use 'full' or 'lora'")
        if self.epochs < 1 or self.batch_size < 1:
            raise SaealignError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be at least 1")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            raise SaealignError(f"lr must be a finite number >= 0 (got {self.lr}); leave it unset for the default")
        if self.max_length < 2:
            raise SaealignError(f"max_length must be at least 2 tokens (got {self.max_length}): one token has no target")
        if not 0 <= self.warmup_ratio < 1:
            raise SaealignError(f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.weight_decay < 0:
            raise SaealignError(f"weight_decay must be >= 0 (got {self.weight_decay})")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise SaealignError(f"max_grad_norm must be > 0 or None (got {self.max_grad_norm})")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise SaealignError(f"lora_r must be >= 1 and lora_alpha > 0 (got r={self.lora_r}, alpha={self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise SaealignError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if not self.lora_targets or isinstance(self.lora_targets, str):
            raise SaealignError("lora_targets must be a non-empty tuple of module names, e.g. ('q_proj', 'v_proj')")

    @property
    def learning_rate(self) -> float:
        """The peak learning rate actually used."""
        return _DEFAULT_LR[self.method] if self.lr is None else self.lr


@dataclass
class FineTuned:
    """A fine-tuned model and what it cost."""

    lm: LoadedModel
    """The tuned model (eval mode, no grad, original dtype, LoRA merged), sharing the base tokenizer."""
    seconds: float
    """Wall time of the whole ``finetune`` call (copy, tokenisation, training, merge)."""
    tokens_seen: int
    """Non-padding tokens fed to the model over all epochs."""
    losses: list[float]
    """Training loss (mean over predicted tokens of the batch) at each optimiser step."""
    config: FineTuneConfig


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each non-blank text, truncated; texts with fewer than 2 tokens (nothing to predict) dropped."""
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise SaealignError("no texts to fine-tune on: every text is empty or whitespace")
    ids = tokenizer(kept, truncation=True, max_length=max_length)["input_ids"]
    rows = [list(r) for r in ids if len(r) >= 2]
    if not rows:
        raise SaealignError("every text is a single token after tokenisation: give texts of at least two tokens")
    return rows


def _batch(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids, attention_mask, labels`` ``[b, s]``; labels are -100 on padding."""
    ids, mask = right_pad(rows, pad_id)
    # Labels from the mask, not from ``ids == pad_id``: the pad id may be EOS, which real text can contain.
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _linear_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the model's linear layers (what LoRA can target)."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)})


def _lora_targets(model: nn.Module, cfg: FineTuneConfig) -> list[str]:
    """The requested LoRA targets that exist in ``model``; checked before any copying or training."""
    present = _linear_names(model)
    targets = [t for t in cfg.lora_targets if t in present]
    if not targets:
        raise SaealignError(
            f"none of the LoRA targets {list(cfg.lora_targets)} is a linear module of this model: "
            f"set lora_targets to some of {present}"
        )
    try:
        import peft  # noqa: F401 - only checking that it is installed
    except ImportError as e:
        raise SaealignError("LoRA needs peft: pip install 'saealign[finetune]'") from e
    return targets


def _with_lora(model: nn.Module, targets: list[str], cfg: FineTuneConfig) -> nn.Module:
    """``model`` wrapped by peft with trainable adapters on ``targets`` (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 reads a transformers 5 property that warns of its own rename: not the user's concern.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)  # type: ignore[arg-type]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps to 1, then linear decay; never exactly 0 on a step that runs."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def finetune(lm: LoadedModel, texts: list[str], cfg: FineTuneConfig = FineTuneConfig(), progress: bool = True) -> FineTuned:
    """Fine-tune a copy of ``lm.model`` on ``texts`` (full or LoRA); ``lm`` itself is left unchanged.

    The returned model's key is ``{lm.key}-ft-{method}-{hash of texts and config}``, so caches built on it
    (indexes, generations) never mix with the base model's.
    """
    start = time.perf_counter()
    rows = _encode(lm.tokenizer, texts, cfg.max_length)
    targets = _lora_targets(lm.model, cfg) if cfg.method == "lora" else []
    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pad_id = int(pad_id) if pad_id is not None else 0  # any id works: padded positions are masked out

    base_param = next(lm.model.parameters())
    dtype, device = base_param.dtype, base_param.device
    model: nn.Module = copy.deepcopy(lm.model).to(torch.float32)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = math.ceil(cfg.warmup_ratio * total)
    losses: list[float] = []
    tokens_seen = 0

    # A private RNG stream: LoRA's init and dropout draw from torch's global generator, which the
    # caller's own seeding should neither affect nor see advanced.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        if cfg.method == "lora":
            model = _with_lora(model, targets, cfg)
        else:
            model.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup))
        order_gen = torch.Generator().manual_seed(cfg.seed)
        model.train()
        with tqdm(total=total, desc=f"fine-tune ({cfg.method})", unit="step", disable=not progress) as bar:
            for _epoch in range(cfg.epochs):
                order = torch.randperm(len(rows), generator=order_gen).tolist()
                for b in range(0, len(order), cfg.batch_size):
                    ids, mask, labels = _batch([rows[i] for i in order[b : b + cfg.batch_size]], pad_id, device)
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    tokens_seen += int(mask.sum())
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")

    if cfg.method == "lora":
        model = model.merge_and_unload()  # type: ignore[operator]
    model.eval()
    model.requires_grad_(False)
    model = model.to(dtype)
    config_json = {**asdict(cfg), "lr": cfg.learning_rate}
    key = f"{lm.key}-ft-{cfg.method}-{hash_json({'texts': texts, 'config': config_json})}"
    tuned = LoadedModel(model=model, tokenizer=tok, name=f"{lm.name}+ft-{cfg.method}", key=key,
                        load_seconds=lm.load_seconds)
    return FineTuned(lm=tuned, seconds=time.perf_counter() - start, tokens_seen=tokens_seen, losses=losses, config=cfg)
