"""DreamBench-style measures, computed from generated images alone through the analyser.

- **subject fidelity**: the share of samples of the subject prompts that show the subject's pattern (the paper's
  DINO / CLIP-I: does the image show *my* subject);
- **prompt fidelity**: over the subject prompts that ask for a background or a place, the share of those requests
  that hold in the samples (the paper's CLIP-T: does it still follow the prompt);
- **prior drift**: the share of samples of the bare class prompt that show the subject instead of the class's
  variety (the paper's PRES: language drift, what prior preservation prevents);
- **diversity**: the mean pixel distance between two samples of the same subject prompt, on a 0-1 scale (the
  paper's DIV: an overfit model repeats its instance images).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .analyse import Reading, analyse
from .world import CLASS_WORD, SUBJECT_WORD

MEASURES = ("subject_fidelity", "prompt_fidelity", "prior_drift", "diversity")


@dataclass(frozen=True)
class Prompt:
    text: str
    background: str = ""  # what the prompt asks for ("" : nothing)
    position: str = ""


SUBJECT = f"a {SUBJECT_WORD} {CLASS_WORD}"
SUBJECT_PROMPTS = (
    Prompt(SUBJECT),
    Prompt(f"{SUBJECT} on a green background", background="green"),
    Prompt(f"{SUBJECT} on a yellow background", background="yellow"),
    Prompt(f"{SUBJECT} on a red background", background="red"),
    Prompt(f"{SUBJECT} in the top left", position="top left"),
    Prompt(f"{SUBJECT} in the bottom right", position="bottom right"),
)
CLASS_PROMPT = Prompt(f"a {CLASS_WORD}")


def prompt_hits(prompt: Prompt, readings: Sequence[Reading]) -> list[bool]:
    """For each sample, whether each request of the prompt holds (one entry per sample and request)."""
    hits = []
    for r in readings:
        if prompt.background:
            hits.append(r.background == prompt.background)
        if prompt.position:
            hits.append(r.found and r.position == prompt.position)
    return hits


def mean_pairwise_distance(images: Sequence[np.ndarray]) -> float:
    """Mean absolute difference (0-1) between every two images, compared at 16x16 so a shift of a pixel or a blurred
    edge counts little and a different colour, shape or place counts fully."""
    small = np.stack([np.asarray(i, dtype=np.float32).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3)) / 255
                      for i in images])
    n = len(small)
    if n < 2:
        return 0.0
    total = sum(float(np.abs(small[i] - small[j]).mean()) for i in range(n) for j in range(i + 1, n))
    return total / (n * (n - 1) / 2)


def measure(samples: Mapping[str, Sequence[np.ndarray]]) -> dict[str, float]:
    """The four measures from ``{prompt text: images}`` for SUBJECT_PROMPTS and CLASS_PROMPT."""
    readings = {text: [analyse(i) for i in images] for text, images in samples.items()}
    subject = [r.subject for p in SUBJECT_PROMPTS for r in readings[p.text]]
    requests = [h for p in SUBJECT_PROMPTS for h in prompt_hits(p, readings[p.text])]
    return {
        "subject_fidelity": float(np.mean(subject)),
        "prompt_fidelity": float(np.mean(requests)),
        "prior_drift": float(np.mean([r.subject for r in readings[CLASS_PROMPT.text]])),
        "diversity": float(np.mean([mean_pairwise_distance(samples[p.text]) for p in SUBJECT_PROMPTS])),
    }
