"""Topic feedback (``spec.feedback``, an option): the additive push fades, row by row, as the text turns to the topic.

One global strength cannot serve every topic: on the steering benchmark the MMLU subjects are on topic by
strength 0.25 and pay for every further push in perplexity, while review and request topics need 0.4. The
feedback reads, at every generated position, how topical the model's *own* state already is, before the push
is added, in the SAE's terms (the per-token signal of M2, here measured against the activation contrast):

    r_t = (a_t · u − ā_ref · u) / |c|

with ``a_t`` the SAE's activations of the unpushed residual, ``c`` the topic's activation contrast (topic mean
minus reference mean, clipped at 0; :mod:`saealign.reference.contrast`), ``u = c / |c|`` and ``ā_ref`` the
reference mean: ``r = 0`` reads like reference text, ``r ≈ 1`` like the topic's own texts. A running mean
``m ← (1 − β)·m + β·clip(r_t, −1, 3)`` over the generated positions sets the push's scale ``clip(1 − m, 0, 1)``:
full while the text is off topic, fading once it reads like the topic, back when it drifts away. The prompt
pass is pushed at full strength and does not count (m starts at 0); positions left unedited (special tokens)
do not count either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from saealign.errors import SaealignError

SMOOTHING = 0.2
"""β: the running mean's weight on the newest position (about the last 5 tokens count)."""


class TopicFeedback:
    """Per-row state of the fading push for one batch (one generation call)."""

    def __init__(self, contrasts: Sequence[np.ndarray], reference: np.ndarray, beta: float = SMOOTHING) -> None:
        """``contrasts``: each row's ``[d_sae]`` activation contrast; ``reference``: ``[d_sae]`` the reference mean."""
        c = torch.as_tensor(np.stack([np.asarray(x, dtype=np.float32) for x in contrasts]))
        norms = c.norm(dim=1)
        if c.dim() != 2 or c.shape[1] != np.asarray(reference).shape[0]:
            raise SaealignError(f"the topic feedback got contrasts of shape {tuple(c.shape)} for a reference of "
                                f"{np.asarray(reference).shape[0]} latents: score the topic with this SAE")
        if not (torch.isfinite(norms).all() and (norms > 0).all()):
            raise SaealignError("a topic has no positive activation contrast: nothing to read its feedback from "
                                "(steer with feedback=False, or give more topic texts)")
        if not 0 < beta <= 1:
            raise SaealignError(f"the feedback's smoothing must lie in (0, 1], got {beta}")
        self.unit = c / norms.unsqueeze(1)
        """``[batch, d_sae]`` u per row."""
        self.reference_dot = self.unit @ torch.as_tensor(np.asarray(reference, dtype=np.float32))
        """``[batch]`` ā_ref · u."""
        self.span = norms
        """``[batch]`` |c|: the topic's distance from the reference along u."""
        self.beta = beta
        self.mean = torch.zeros(c.shape[0])
        """``[batch]`` m, the running topicality of each row's generated positions."""

    def topicality(self, acts: Tensor) -> Tensor:
        """``[batch, seq]`` r of every position from the SAE's activations ``[batch, seq, d_sae]``."""
        unit = self.unit.to(acts.device, torch.float32)
        dots = torch.einsum("bsl,bl->bs", acts.float(), unit)
        return (dots - self.reference_dot.to(acts.device).unsqueeze(1)) / self.span.to(acts.device).unsqueeze(1)

    def scale(self, acts: Tensor, keep: Tensor | None) -> Tensor:
        """``[batch, 1]`` the push's scale for this forward call; updates the state on a one-position call.

        ``acts [batch, seq, d_sae]`` are the activations of the unpushed residual; ``keep [batch, seq]``
        (or None) marks positions passed through unedited, which do not count."""
        if acts.shape[0] != self.mean.shape[0]:
            raise SaealignError(f"the topic feedback holds {self.mean.shape[0]} rows, the batch has {acts.shape[0]}")
        if acts.shape[1] == 1:
            r = self.topicality(acts)[:, 0].clamp(-1.0, 3.0).cpu()
            counted = torch.ones_like(r, dtype=torch.bool) if keep is None else ~keep[:, 0].cpu()
            self.mean = torch.where(counted, (1 - self.beta) * self.mean + self.beta * r, self.mean)
        return (1 - self.mean).clamp(0.0, 1.0).unsqueeze(1)
