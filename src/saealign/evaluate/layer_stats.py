"""Layer-level output of the edits (the paper's Fig. 5/6 and A.4), measured per content token.

The texts are run teacher-forced (their own tokens, no generation) up to the hooked layer; each
method of :func:`saealign.steering.edits.apply_edit` then edits the residual of every content token, and
per token we measure (``a = σ(γ)``, ``a'`` the edited latents, ``x`` the residual):

- ``changed``: latents whose activation differs between a and a' (Fig. 5);
- ``contamination`` of a' and ``contamination_plain`` of a (METHOD.md);
- ``err_diff = ‖x − dec(a')‖ − ‖x − dec(a)‖``: reconstruction error of the edit minus that of the
  plain SAE (Fig. 6; < 0 means the edit is closer to the original residual than the SAE);
- ``shift = ‖out − x‖``: how far the layer output actually moves under the output ``mode``
  (``error`` mode: ``‖dec(a') − dec(a)‖``; ``replace``: ``‖dec(a') − x‖``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saealign.errors import SaealignError
from saealign.evaluate.experiments import content_residuals
from saealign.models import LoadedModel
from saealign.reference.scoring import TopicScores
from saealign.sae.autoencoder import SAE
from saealign.steering.edits import Steering, apply_edit, contamination
from saealign.steering.spec import METHODS

_PER_TOKEN = ("changed", "active", "contamination", "contamination_plain", "err_plain", "err_edit", "err_diff",
              "shift", "x_norm")


def _score_tensor(scores: TopicScores | np.ndarray | Tensor, d_sae: int, device: torch.device) -> Tensor:
    s = torch.as_tensor(scores.scores if isinstance(scores, TopicScores) else scores, dtype=torch.float32)
    if s.shape != (d_sae,) or not torch.isfinite(s).all() or s.min() < 0 or s.max() > 1:
        raise SaealignError(f"scores must be a [{d_sae}] vector in [0, 1] (1 = aligned), got shape {tuple(s.shape)}")
    return s.to(device)


@torch.inference_mode()
def layer_token_values(
    sae: SAE,
    lm: LoadedModel,
    layer: int,
    scores: TopicScores | np.ndarray | Tensor,
    max_act: np.ndarray | Tensor | None,
    texts_by_kind: Mapping[str, Sequence[str]],
    methods: Sequence[str] = ("clamp", "swap"),
    mode: str = "error",
    steering: Steering | None = None,
    max_seq_len: int = 128,
    batch_size: int = 16,
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per-token measurements for every ``(method, kind)``: ``{name: [n_tokens]}`` arrays.

    Names: ``changed, active`` (int64), ``contamination, contamination_plain, err_plain, err_edit,
    err_diff, shift, x_norm`` (float32; see the module docstring), ``text`` (index into the kind's
    texts) and ``token_id``. ``steering`` supplies clamp_n, clamp_multiplier and strength (None: the
    paper's, 5 latents at 10x max and strength 1); its method and mode are replaced by each of
    ``methods`` and ``mode``. ``max_act [d_sae]`` is needed
    by clamp (the index's ``latent_max_act``).
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SaealignError(f"unknown or no methods {bad}: use some of {', '.join(METHODS)}")
    if not texts_by_kind:
        raise SaealignError("texts_by_kind is empty: pass e.g. {'aligned': [...], 'unaligned': [...]}")
    device = sae.W_enc.device
    s = _score_tensor(scores, sae.d_sae, device)
    ma = None if max_act is None else torch.as_tensor(max_act, dtype=torch.float32, device=device)
    if "clamp" in methods and ma is None:
        raise SaealignError("clamp needs max_act (each latent's max activation: the index's latent_max_act)")
    steering = steering or Steering()
    edits = {m: Steering(m, mode, steering.clamp_n, steering.clamp_multiplier, steering.strength) for m in methods}
    out: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for kind, texts in texts_by_kind.items():
        if not any(isinstance(t, str) and t.strip() for t in texts):
            raise SaealignError(f"no {kind} texts given: pass at least one non-empty text per kind")
        parts: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in methods}
        for x, text, token_id in content_residuals(lm, layer, texts, max_seq_len, batch_size):
            xf = x.float()
            for m, st in edits.items():
                res = apply_edit(sae, x, st, s, ma)
                dec_plain = sae.decode(res.acts_plain, x).float()
                same = res.acts_edited is res.acts_plain  # none/sae: the same tensor, the same decode
                dec_edit = dec_plain if same else sae.decode(res.acts_edited, x).float()
                err_plain = (xf - dec_plain).norm(dim=-1)
                err_edit = (xf - dec_edit).norm(dim=-1)
                values = {
                    "changed": res.n_changed, "active": res.n_active, "contamination": res.contamination,
                    "contamination_plain": contamination(res.acts_plain, s), "err_plain": err_plain,
                    "err_edit": err_edit, "err_diff": err_edit - err_plain,
                    "shift": (res.out.float() - xf).norm(dim=-1), "x_norm": xf.norm(dim=-1),
                    "text": text, "token_id": token_id,
                }
                for name, v in values.items():
                    parts[m].setdefault(name, []).append(v.cpu().numpy())
        for m in methods:
            if not parts[m]:
                raise SaealignError(f"the {kind} texts have no content tokens (only special or first tokens): "
                                    "pass longer texts")
            out[(m, kind)] = {name: np.concatenate(v) for name, v in parts[m].items()}
    return out


def _rel(values: np.ndarray, norms: np.ndarray) -> float:
    """Mean of ``values / ‖x‖`` per token (a zero residual counts as norm 1, not as inf)."""
    return float(np.mean(values / np.where(norms > 0, norms, 1)))


def layer_statistics(
    sae: SAE,
    lm: LoadedModel,
    layer: int,
    scores: TopicScores | np.ndarray | Tensor,
    max_act: np.ndarray | Tensor | None,
    texts_by_kind: Mapping[str, Sequence[str]],
    methods: Sequence[str] = ("clamp", "swap"),
    mode: str = "error",
    steering: Steering | None = None,
    max_seq_len: int = 128,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Fig. 5/6 summarised: one row per ``(method, kind)`` of :func:`layer_token_values`.

    Row: ``method, mode, kind, tokens``; ``changed_mean/std/median/max`` (latents changed per token);
    ``active_mean`` (active latents of a'); ``contamination`` (mean, with ``contamination_std``) and
    ``contamination_plain`` (of the unedited a); ``err_plain`` and ``err_plain_rel`` (plain SAE
    reconstruction error, absolute and over ‖x‖); ``err_diff``, ``err_diff_std``, ``err_diff_rel``
    (edit minus plain, see the module docstring); ``shift`` and ``shift_rel`` (layer-output change).
    """
    values = layer_token_values(sae, lm, layer, scores, max_act, texts_by_kind, methods, mode, steering,
                                max_seq_len, batch_size)
    rows: list[dict[str, Any]] = []
    for (method, kind), v in values.items():
        changed = v["changed"].astype(np.float64)
        rows.append({
            "method": method, "mode": mode, "kind": kind, "tokens": int(changed.size),
            "changed_mean": float(changed.mean()), "changed_std": float(changed.std()),
            "changed_median": float(np.median(changed)), "changed_max": int(changed.max()),
            "active_mean": float(v["active"].mean()),
            "contamination": float(v["contamination"].mean()), "contamination_std": float(v["contamination"].std()),
            "contamination_plain": float(v["contamination_plain"].mean()),
            "err_plain": float(v["err_plain"].mean()), "err_plain_rel": _rel(v["err_plain"], v["x_norm"]),
            "err_diff": float(v["err_diff"].mean()), "err_diff_std": float(v["err_diff"].std()),
            "err_diff_rel": _rel(v["err_diff"], v["x_norm"]),
            "shift": float(v["shift"].mean()), "shift_rel": _rel(v["shift"], v["x_norm"]),
        })
    return rows


def layer_token_rows(lm: LoadedModel, values: dict[tuple[str, str], dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """The per-token table behind Fig. 5/6 (histograms, scatter of err_diff vs contamination).

    ``values`` from :func:`layer_token_values`. Row per token and method: ``method, kind, text,
    position`` (among the text's content tokens), ``token`` (its string), and the per-token numbers.
    """
    rows: list[dict[str, Any]] = []
    for (method, kind), v in values.items():
        text = v["text"]
        # tokens arrive text by text in order, so a token's position is its offset from its text's first
        position = np.arange(text.size) - np.searchsorted(text, text, side="left")
        tokens = lm.tokenizer.convert_ids_to_tokens([int(i) for i in v["token_id"]])
        for j in range(text.size):
            row: dict[str, Any] = {"method": method, "kind": kind, "text": int(text[j]), "position": int(position[j]),
                                   "token": str(tokens[j])}
            row |= {name: (int(v[name][j]) if name in ("changed", "active") else float(v[name][j]))
                    for name in _PER_TOKEN}
            rows.append(row)
    return rows
