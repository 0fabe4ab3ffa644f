"""Does M1 find topic latents on real data? MMLU as P_ref, MedQuAD answers as the topic.

The top-k latents of the medical topic should put far more of their activation mass on MMLU's
medical subjects than latents in general do. ``ratio`` = (share of the top latents' activation
mass on medical prompts) / (share of all latents' activation mass on medical prompts).
"""

from __future__ import annotations

import numpy as np

from saealign.reference.index import ReferenceIndex
from saealign.reference.scoring import TopicScores

MMLU_MEDICAL = (
    "anatomy", "clinical_knowledge", "college_medicine", "medical_genetics", "professional_medicine",
    "virology", "nutrition", "human_aging",
)  # fmt: skip


def medical_mass_ratio(index: ReferenceIndex, scores: TopicScores, top: int = 20,
                       labels: tuple[str, ...] = MMLU_MEDICAL) -> dict[str, float]:
    """Share of the top latents' activation mass on prompts labelled ``labels``, vs the base rate."""
    on_topic = np.isin(np.asarray(index.labels), labels)
    mass = index.act_sum  # [P, L] summed activations per prompt
    chosen = scores.top(top)
    top_mass = np.asarray(mass[:, chosen].sum(axis=1)).ravel()
    all_mass = np.asarray(mass.sum(axis=1)).ravel()
    top_share = float(top_mass[on_topic].sum() / top_mass.sum())
    base_share = float(all_mass[on_topic].sum() / all_mass.sum())
    return {
        "top": float(top),
        "top_share": top_share,
        "base_share": base_share,
        "ratio": top_share / base_share,
        "prompt_share": float(on_topic.mean()),
        "medical_prompts": int(on_topic.sum()),
        "prompts": int(len(on_topic)),
    }
