"""Zero-shot classification: score every label (through text templates) against every image.

    from blipkit.tasks import classify
    classify(model, ["cat.jpg"], ["cat", "dog", "bird"], templates=["a picture of a {}", "a photo of a {}"], k=2)
    # [[("cat", 0.97), ("dog", 0.02)]]

Two heads:
- "itc": each label's text embedding is the normalised mean over its templates (prompt ensembling, as CLIP does);
  scores are softmax(similarity / temperature) over the labels, so they sum to one per image.
- "itm": each label's score is the ITM match probability averaged over its templates; scores are independent per
  label (they need not sum to one), which suits multi-label questions ("is there a red object?").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import BlipBase, text_list
from ..errors import InputError
from .common import (
    check_choice,
    check_top,
    encode_images,
    encode_texts,
    itc_scores,
    itm_logits,
    match_probs,
    require_head,
    texts_of,
)
from .common import temperature as itc_temperature

DEFAULT_TEMPLATES: tuple[str, ...] = ("a picture of {}",)


def prompts(labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Every label in every template, label-major: [t0(l0), t1(l0), ..., t0(l1), ...]."""
    labels = texts_of(labels, "labels", "label")
    templates = text_list(templates, "templates", "template")
    for t in templates:
        try:
            filled = t.format("") if t.count("{}") == 1 else None
        except (IndexError, KeyError, ValueError):  # other fields ("{0}", "{name}") or lone braces
            filled = None
        if filled is None:
            raise InputError(f"template {t!r:.60} must contain '{{}}' exactly once, where the label goes, and no "
                             "other braces (write '{{' and '}}' for literal ones)")
    return [t.format(label) for label in labels for t in templates]


@torch.no_grad()
def label_scores(
    model: BlipBase,
    images: Any,
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    head: str = "itc",
    temperature: float | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> Tensor:
    """Scores (Ni, Nl) of every label for every image: ITC softmax probabilities or ITM match probabilities.

    Args:
        images: a path, PIL image, (3, H, W) tensor, or a list of them.
        labels: class names put in the templates' `{}`.
        templates: e.g. ("a picture of {}",); several are averaged.
        head: "itc" or "itm" (see the module docstring).
        temperature: ITC softmax temperature (default: the model's `temp`, else 0.07).
    """
    check_choice(head, ("itc", "itm"), "head")
    texts = prompts(labels, templates)
    nl, nt = len(texts_of(labels, "labels", "label")), len(text_list(templates, "templates", "template"))
    require_head(model, head, "classify images zero-shot")
    if head == "itc":
        text_emb = F.normalize(encode_texts(model, texts).view(nl, nt, -1).mean(dim=1), dim=-1)  # (Nl, D)
        image_emb = encode_images(model, images, batch_size, progress)
        return (itc_scores(image_emb, text_emb) / itc_temperature(model, temperature)).softmax(dim=-1).cpu()
    probs = match_probs(itm_logits(model, images, texts, batch_size, progress))  # (Ni, Nl * Nt)
    return probs.view(probs.shape[0], nl, nt).mean(dim=-1).cpu()


def classify(
    model: BlipBase,
    images: Any,
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    head: str = "itc",
    k: int = 5,
    temperature: float | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
) -> list[list[tuple[str, float]]]:
    """The top-`k` (label, score) pairs for each image, best first (see `label_scores` for the arguments)."""
    labels = texts_of(labels, "labels", "label")
    k = check_top(k, len(labels))
    scores = label_scores(model, images, labels, templates, head, temperature, batch_size, progress)
    top = scores.topk(k, dim=-1)
    return [
        [(labels[int(j)], float(s)) for s, j in zip(vals, idx, strict=True)]
        for vals, idx in zip(top.values, top.indices, strict=True)
    ]
