"""Activation contrast: how much more each SAE latent fires on a topic's own texts than on reference text.

M1's score says *which* latents belong to a topic (they fire on reference prompts near it). It does not say how
strongly the topic's own texts use them: a latent can fire on a few near-topic reference prompts and barely at
all on the topic. The additive methods weigh each latent by

    contrast_i = max(0, mean_t a_i(topic texts) − reference_i)

(mean activation per content token), after FGAA (Soo et al. 2025, "Interpretable steering of large language
models with feature guided activation additions"), which builds its direction from the contrast of the SAE's
mean activations on target and neutral text. The reference (:meth:`saealign.steering.aligner.Aligner.reference_mean`)
is, per latent, the larger of its mean on the index's corpus (the index's exact per-latent totals, free) and on
the model's own unsteered text (measured once per model, SAE and layer with the steering basis): a feature the
topic shares with either is not what makes the text the topic's. The topic mean is one forward pass over the
topic texts, up to the deepest pushed layer (the main and the companion layers share it: 0.4-3.4 s for 30 texts
on the default model on a 2-core CPU, the long ones costing the most), computed when the topic is scored and kept
with its :class:`TopicScores`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.residual_stream import content_residuals
from saealign.sae.autoencoder import SAE


def mean_activation(lm: LoadedModel, sae: SAE, layer: int, texts: Sequence[str]) -> np.ndarray:
    """``[d_sae]`` float64: each latent's activation summed over the content tokens of ``texts``, per token.

    Attention sinks past the first position are left out (:func:`saealign.residual_stream.massive_positions`):
    one of them in 30 short requests made four sink latents the whole of a travel topic's direction."""
    return mean_activations(lm, [(sae, layer)], texts)[0]


@torch.inference_mode()
def mean_activations(lm: LoadedModel, saes: Sequence[tuple[SAE, int]], texts: Sequence[str], max_seq_len: int = 128,
                     batch_size: int = 32) -> list[np.ndarray]:
    """:func:`mean_activation` of each ``(sae, layer)`` from ONE partial forward pass per batch of ``texts``.

    An aligner with companion layers needs the topic's mean at every pushed layer; a pass per layer ran the model's
    first blocks over the topic texts three times (about 3 s of ``strength="auto"``'s time per topic on a CPU).
    One pass up to the deepest layer reads them all. Sums are float64 over tokens, so the result does not depend on
    which other layers share the pass."""
    layers = [layer for _, layer in saes]
    totals = [torch.zeros(sae.d_sae, dtype=torch.float64) for sae, _ in saes]
    counts = [0] * len(saes)
    for kept in content_residuals(lm.model, lm.tokenizer, layers, texts, max_seq_len, batch_size, by_length=True):
        for k, (sae, layer) in enumerate(saes):
            totals[k] += sae.encode(kept[layer]).double().sum(dim=0).cpu()
            counts[k] += len(kept[layer])
    if not texts or min(counts) == 0:
        raise SaealignError("the topic texts have no content tokens (empty, or special tokens only): "
                            "give texts with words in them")
    return [(total / count).numpy() for total, count in zip(totals, counts, strict=True)]


def activation_contrast(topic_mean: np.ndarray, reference_mean: np.ndarray) -> np.ndarray:
    """``[d_sae]`` float32 ``max(0, topic_mean − reference_mean)``; one clear error on a size mismatch or NaN."""
    topic_mean = np.asarray(topic_mean, dtype=np.float64)
    reference_mean = np.asarray(reference_mean, dtype=np.float64)
    if topic_mean.shape != reference_mean.shape:
        raise SaealignError(f"the topic's activations cover {topic_mean.shape[0]} latents but the reference's "
                            f"{reference_mean.shape[0]}: score the topic with the index's SAE")
    if not (np.isfinite(topic_mean).all() and np.isfinite(reference_mean).all()):
        raise SaealignError("the topic's or the reference's mean activations are not finite: re-score the topic")
    return np.maximum(topic_mean - reference_mean, 0.0).astype(np.float32)
