"""The ``diffmean`` baseline: push along the difference of mean residuals, topic texts minus the model's own text.

AxBench (Wu et al. 2025) found this plain difference of means ("DiffMean") the strongest representation-based
steering method it tried, stronger than SAE features picked by their labels. It needs no SAE at all, so it is the
control that says whether the SAE's latents add anything to a direction: ``add`` builds its direction from the
decoder rows of the topic's best latents; ``diffmean`` takes

    v = unit(mean_t h_L(topic texts) − mean_t h_L(model's own unsteered text))

over the content tokens of the residual stream after block ``L`` (special tokens, the first position and later
attention sinks left out, as everywhere else), and adds ``strength × ρ × v`` exactly as ``add`` does, at the main
layer and at each companion layer (each with its own mean difference). The reference is the model's own text, the
same text ``add``'s contrast subtracts (:meth:`saealign.steering.aligner.Aligner.default_texts`), so the two
methods differ in the direction alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saealign.cache import atomic_write_bytes, cache_dir, hash_json
from saealign.errors import SaealignError
from saealign.models import LoadedModel
from saealign.residual_stream import content_residuals


@torch.inference_mode()
def residual_mean(lm: LoadedModel, layer: int, texts: Sequence[str], max_seq_len: int = 128,
                  batch_size: int = 16) -> np.ndarray:
    """``[d_model]`` float64: the mean residual after block ``layer`` over the content tokens of ``texts``."""
    total = torch.zeros(lm.d_model, dtype=torch.float64)
    count = 0
    for kept in content_residuals(lm.model, lm.tokenizer, [layer], texts, max_seq_len, batch_size):
        total += kept[layer].double().sum(dim=0).cpu()
        count += len(kept[layer])
    if count == 0:
        raise SaealignError("the topic texts have no content tokens (empty, or special tokens only): "
                            "give texts with words in them")
    return (total / count).numpy()


OWN_MEAN_VERSION = 1


def load_or_measure_own_mean(lm: LoadedModel, layer: int, prompts: Sequence[str], sampling: dict[str, int],
                             own_texts: Callable[[], Sequence[str]], folder: Path | None = None) -> np.ndarray:
    """``[d_model]`` the mean residual of the model's own text at ``layer``, from the cache or measured and saved.

    ``own_texts`` (sampling the model: tens of seconds on a CPU) is called only when nothing valid is cached; the
    cache key holds the model, the layer, the prompts and the ``sampling`` settings the texts come from. A corrupt
    or foreign file is measured anew and overwritten."""
    key = {"model": lm.key, "layer": layer % lm.n_layers, "prompts": list(prompts), "sampling": sampling,
           "v": OWN_MEAN_VERSION}
    path = (folder or cache_dir() / "steering") / f"own-mean-{hash_json(key)[:16]}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            mean = np.asarray(saved["mean"], dtype=np.float64)
            if saved.get("key") == key and mean.shape == (lm.d_model,) and np.isfinite(mean).all():
                return mean
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            pass
    mean = residual_mean(lm, layer, list(own_texts()))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"key": key, "mean": mean.tolist()}).encode())
    return mean


def mean_shift(topic_mean: np.ndarray, reference_mean: np.ndarray) -> Tensor:
    """The unit ``[d_model]`` float32 direction ``topic_mean − reference_mean``; one error line where it has none."""
    topic_mean = np.asarray(topic_mean, dtype=np.float64)
    reference_mean = np.asarray(reference_mean, dtype=np.float64)
    if topic_mean.shape != reference_mean.shape:
        raise SaealignError(f"the topic's mean residual has {topic_mean.shape[0]} values but the reference's "
                            f"{reference_mean.shape[0]}: they come from different models")
    shift = topic_mean - reference_mean
    norm = float(np.linalg.norm(shift))
    if not np.isfinite(norm):
        raise SaealignError("the topic's or the reference's mean residual is not finite: nothing to steer along")
    if norm <= 1e-6 * max(float(np.linalg.norm(reference_mean)), 1e-12):
        raise SaealignError("the topic texts read like the model's own text (their mean residuals are the same): "
                            "diffmean has no direction to push; give texts that are about the topic")
    return torch.from_numpy(shift / norm).float()
