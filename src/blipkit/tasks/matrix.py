"""Score matrix images x texts, as numbers and as a heatmap labelled with thumbnails and texts.

    from blipkit.tasks import score_matrix, render_matrix
    scores = score_matrix(model, ["a.png", "b.png"], ["a red circle", "a blue square"], head="itm")  # (2, 2)
    render_matrix(scores, ["a.png", "b.png"], ["a red circle", "a blue square"], "matrix.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..base import BlipBase
from ..errors import InputError
from .common import (
    as_items,
    check_choice,
    check_nonempty,
    encode_images,
    encode_texts,
    itc_scores,
    itm_logits,
    match_probs,
    require_head,
)
from .render import as_pil, item_name, new_figure, save, thumbnail, wrap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_THUMBNAILS = 40  # rows beyond this are labelled by name only
MAX_ANNOTATED = 400  # cells beyond this are not printed with their value


@torch.no_grad()
def score_matrix(
    model: BlipBase,
    images: Any,
    texts: Sequence[str],
    head: str = "itc",
    batch_size: int = 32,
    progress: bool | None = None,
) -> Tensor:
    """Scores (Ni, Nt) on the CPU: ITC cosine similarity (head="itc") or ITM match probability (head="itm")."""
    check_choice(head, ("itc", "itm"), "head")
    require_head(model, head, f"compute an {head.upper()} score matrix")
    texts = as_items(texts)
    check_nonempty(texts, "texts")
    if head == "itc":
        return itc_scores(encode_images(model, images, batch_size, progress), encode_texts(model, texts)).cpu()
    return match_probs(itm_logits(model, images, texts, batch_size, progress)).cpu()


def render_matrix(
    scores: Tensor,
    images: Any,
    texts: Sequence[str],
    path: str | Path | None = None,
    title: str | None = None,
    processor: Any = None,
) -> Figure:
    """Heatmap of `scores` (Ni, Nt): one row per image (thumbnail and name), one column per text; PNG at `path`."""
    images, texts = as_items(images), as_items(texts)
    scores = scores.detach().float().cpu()
    if tuple(scores.shape) != (len(images), len(texts)):
        raise InputError(f"scores are {tuple(scores.shape)} but there are {len(images)} images and {len(texts)} texts")
    ni, nt = len(images), len(texts)
    thumbs = ni <= MAX_THUMBNAILS
    cell = 0.9
    fig = new_figure(width=2.2 + (1.1 if thumbs else 0) + cell * nt, height=2.4 + cell * ni, layout="constrained")
    spec = fig.add_gridspec(ni, 2 if thumbs else 1, width_ratios=[1.0, nt] if thumbs else None, wspace=0.02)
    ax = fig.add_subplot(spec[:, -1])
    im = ax.imshow(scores.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(nt), [wrap(t, 22) for t in texts], rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(ni), [item_name(x, i) for i, x in enumerate(images)], fontsize=8)
    ax.yaxis.tick_right()
    if ni * nt <= MAX_ANNOTATED:
        lo, hi = float(scores.min()), float(scores.max())
        for i in range(ni):
            for j in range(nt):
                v = float(scores[i, j])
                light = hi > lo and (v - lo) / (hi - lo) < 0.6
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if light else "black")
    fig.colorbar(im, ax=ax, location="top", fraction=0.03, pad=0.02, aspect=30)
    if thumbs:
        for i, item in enumerate(images):
            tax = fig.add_subplot(spec[i, 0])
            tax.imshow(thumbnail(as_pil(item, processor), 96))
            tax.set_axis_off()
    fig.suptitle(title or "image-text scores", fontsize=11)
    if path is not None:
        save(fig, path)
    return fig
