"""How good an SAE is on held-out text: explained variance, L0, dead latents, CE increase.

Explained variance is reported twice: over all content tokens, and without tokens whose residual
norm exceeds 3x the median. A few percent of tokens have huge norms in small LMs; they dominate the
variance and inflate EV, so the second figure says how well ordinary tokens are reconstructed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saealign.models import LoadedModel
from saealign.residual_stream import content_mask, hidden_from_output, layer_module, special_token_ids
from saealign.sae.autoencoder import SAE

OUTLIER_NORM_RATIO = 3.0


@dataclass(frozen=True)
class SAEQuality:
    """Held-out figures of one SAE."""

    tokens: int
    """Content tokens evaluated (first position and special tokens left out)."""
    explained_variance: float
    """1 - FVU over all content tokens."""
    explained_variance_no_outliers: float
    """1 - FVU without tokens whose norm exceeds 3x the median norm."""
    outlier_fraction: float
    """Share of tokens above 3x the median norm."""
    l0: float
    """Mean active latents per token."""
    dead_fraction: float
    """Share of latents that fire on no held-out token."""
    ce_clean: float
    """LM cross-entropy (nats/token) on the held-out texts."""
    ce_spliced: float
    """Same, with the SAE reconstruction replacing the layer output at content positions."""
    ce_increase: float
    """ce_spliced - ce_clean."""


class _Splice:
    """Forward hook replacing content positions of a block's output with the SAE reconstruction."""

    def __init__(self, sae: SAE) -> None:
        self.sae = sae
        self.mask: Tensor | None = None

    def __call__(self, _mod: nn.Module, _inp: object, out: object) -> object:
        h = hidden_from_output(out)
        assert self.mask is not None
        recon = self.sae(h).to(h.dtype)
        new = torch.where(self.mask.unsqueeze(-1), recon, h)
        return new if isinstance(out, Tensor) else (new, *out[1:])  # type: ignore[index]


def _capture_into(store: list[Tensor], _mod: nn.Module, _inp: object, out: object) -> None:
    store.append(hidden_from_output(out))


def _ce(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over positions whose *target* is a real token."""
    # A target counts when it and the position predicting it are real tokens (left padding safe).
    target_ok = mask[:, 1:].bool() & mask[:, :-1].bool()
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float(nll[target_ok].sum()), int(target_ok.sum())


@torch.inference_mode()
def evaluate_sae(
    lm: LoadedModel, sae: SAE, layer: int, texts: list[str], max_seq_len: int = 128,
    batch: int = 16, progress: bool = True,
) -> SAEQuality:
    """Measure ``sae`` at ``layer`` of ``lm`` on ``texts`` (full forwards: CE needs the logits)."""
    tok = lm.tokenizer
    special = special_token_ids(tok)
    module = layer_module(lm.model, layer)
    xs: list[Tensor] = []
    errs: list[Tensor] = []
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    l0_sum, n_tok = 0.0, 0
    ce_clean = ce_spliced = 0.0
    n_ce = 0
    splice = _Splice(sae)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for b in tqdm(range(0, len(order), batch), desc=f"evaluate SAE L{layer}", disable=not progress):
        enc = tok([texts[i] for i in order[b : b + batch]], return_tensors="pt", padding=True,  # type: ignore[operator]
                  truncation=True, max_length=max_seq_len)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        keep = content_mask(ids, mask, special)
        captured: list[Tensor] = []
        handle = module.register_forward_hook(functools.partial(_capture_into, captured))
        try:
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            handle.remove()
        s, n = _ce(logits, ids, mask)
        ce_clean += s
        n_ce += n
        x = captured[0][keep].float()
        acts = sae.encode(x)
        recon = sae.decode(acts, x).float()
        xs.append(x)
        errs.append((x - recon).pow(2).sum(dim=-1))
        fired |= (acts > 0).any(dim=0)
        l0_sum += float((acts > 0).sum())
        n_tok += x.shape[0]
        splice.mask = keep
        handle = module.register_forward_hook(splice)
        try:
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            handle.remove()
        ce_spliced += _ce(logits, ids, mask)[0]
    x_all = torch.cat(xs)
    err_all = torch.cat(errs)
    norms = x_all.norm(dim=-1)
    normal = norms <= OUTLIER_NORM_RATIO * norms.median()

    def ev(sel: Tensor) -> float:
        xv = x_all[sel]
        return float(1 - err_all[sel].sum() / (xv - xv.mean(dim=0)).pow(2).sum())

    clean, spliced = ce_clean / max(1, n_ce), ce_spliced / max(1, n_ce)
    return SAEQuality(
        tokens=n_tok,
        explained_variance=ev(torch.ones_like(normal)),
        explained_variance_no_outliers=ev(normal),
        outlier_fraction=float((~normal).float().mean()),
        l0=l0_sum / max(1, n_tok),
        dead_fraction=float((~fired).float().mean()),
        ce_clean=clean,
        ce_spliced=spliced,
        ce_increase=spliced - clean,
    )
