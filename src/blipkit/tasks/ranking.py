"""Ranking texts for an image and images for a text, over an in-memory collection.

    from blipkit.tasks import Collection, rank_texts
    rank_texts(model, "photo.jpg", ["a dog on a sofa", "a cat", "a red car"], k=2)
    gallery = Collection(model, images=paths)           # ITC embeddings computed once
    gallery.search_images("a red circle", k=5, top_n=32)

The two-stage recipe of BLIP's retrieval evaluation: ITC similarity for every item, the ITM head on the `top_n` best
only, and final score = ITM "match" logit + ITC cosine similarity. Every hit carries both scores. With
`head="itc"` or `head="itm"` a single head ranks every item (ITM exhaustively: slow on large collections).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..base import BlipBase
from ..errors import CapabilityError, InputError
from .common import (
    as_items,
    check_choice,
    check_nonempty,
    check_top,
    encode_images,
    encode_texts,
    has_itc,
    has_itm,
    itc_scores,
    itm_logits,
    require_head,
)

HEADS = ("two-stage", "itc", "itm")
DEFAULT_TOP_N = 32


@dataclass
class Hit:
    """One ranked item: its index in the collection, the final score and the scores of each head that ran."""

    index: int
    score: float
    itc: float | None = None  # ITC cosine similarity
    itm: float | None = None  # ITM match probability
    itm_logit: float | None = None  # ITM "match" logit

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def default_head(model: BlipBase) -> str:
    """"two-stage" when the model has both ITC and ITM, else the one head it has."""
    itc, itm = has_itc(model), has_itm(model)
    if itc and itm:
        return "two-stage"
    if itc or itm:
        return "itc" if itc else "itm"
    model.require("itm", "rank images and texts")
    raise CapabilityError(f"{model.name_or_path} has neither ITC projections nor an ITM head")


class Collection:
    """Images and/or texts held in memory with their ITC embeddings, searched with ITC and re-ranked with ITM."""

    def __init__(
        self,
        model: BlipBase,
        images: Any = None,
        texts: Sequence[str] | None = None,
        batch_size: int = 32,
        progress: bool | None = None,
    ) -> None:
        self.model = model
        self.images = as_items(images) if images is not None else []
        self.texts = as_items(texts) if texts is not None else []
        self.batch_size = batch_size
        self.progress = progress
        itc = has_itc(model)
        self.image_emb = encode_images(model, self.images, batch_size, progress) if itc and self.images else None
        self.text_emb = encode_texts(model, self.texts) if itc and self.texts else None

    def search_images(self, text: str, k: int = 10, top_n: int = DEFAULT_TOP_N, head: str | None = None) -> list[Hit]:
        """The `k` images that best match `text`, best first."""
        if not isinstance(text, str):
            raise InputError(f"search_images takes one text, got {type(text).__name__}")
        check_nonempty(self.images, "images in the collection")

        def itc():
            return itc_scores(self.image_emb, encode_texts(self.model, [text]))[:, 0]

        def itm(idx: list[int]):
            chosen = [self.images[i] for i in idx]
            return itm_logits(self.model, chosen, [text], self.batch_size, self.progress)[:, 0]

        return self._rank(len(self.images), itc, itm, k, top_n, head)

    def search_texts(self, image: Any, k: int = 10, top_n: int = DEFAULT_TOP_N, head: str | None = None) -> list[Hit]:
        """The `k` texts that best match `image`, best first."""
        items = as_items(image)
        if len(items) != 1:
            raise InputError(f"search_texts takes one image, got {len(items)}")
        check_nonempty(self.texts, "texts in the collection")

        def itc():
            return itc_scores(encode_images(self.model, items, progress=False), self.text_emb)[0]

        def itm(idx: list[int]):
            return itm_logits(self.model, items, [self.texts[i] for i in idx], progress=False)[0]

        return self._rank(len(self.texts), itc, itm, k, top_n, head)

    def _rank(self, n: int, itc, itm, k: int, top_n: int, head: str | None) -> list[Hit]:
        head = head or default_head(self.model)
        check_choice(head, HEADS, "head")
        k, top_n = check_top(k, n), check_top(top_n, n, "top_n")
        if head in ("two-stage", "itc"):
            require_head(self.model, "itc", "rank with ITC")
        if head in ("two-stage", "itm"):
            require_head(self.model, "itm", "rank with ITM")
        if head == "itc":
            sims = itc()
            top = sims.topk(k)
            return [Hit(int(i), float(s), itc=float(s)) for s, i in zip(top.values, top.indices, strict=True)]
        if head == "itm":
            logits = itm(list(range(n)))  # (n, 2)
            probs = logits.softmax(-1)[:, 1]
            top = probs.topk(k)
            return [
                Hit(int(i), float(p), itm=float(p), itm_logit=float(logits[i, 1]))
                for p, i in zip(top.values, top.indices, strict=True)
            ]
        sims = itc()
        first = sims.topk(top_n).indices.tolist()
        logits = itm(first)  # (len(first), 2)
        probs = logits.softmax(-1)[:, 1]
        final = logits[:, 1] + sims[first]
        order = torch.argsort(final, descending=True)[:k].tolist()
        return [
            Hit(first[j], float(final[j]), itc=float(sims[first[j]]), itm=float(probs[j]),
                itm_logit=float(logits[j, 1]))
            for j in order
        ]


def rank_texts(
    model: BlipBase, image: Any, texts: Sequence[str], k: int | None = None, top_n: int | None = None,
    head: str | None = None,
) -> list[Hit]:
    """Rank `texts` for one image (default: every text, two-stage when the model has ITC and ITM)."""
    texts = as_items(texts)
    check_nonempty(texts, "texts")
    return Collection(model, texts=texts).search_texts(image, check_top(k, len(texts)),
                                                       check_top(top_n, len(texts), "top_n"), head)


def rank_images(
    model: BlipBase, text: str, images: Any, k: int | None = None, top_n: int | None = None,
    head: str | None = None, batch_size: int = 32, progress: bool | None = None,
) -> list[Hit]:
    """Rank `images` for one text (default: every image, two-stage when the model has ITC and ITM)."""
    images = as_items(images)
    check_nonempty(images, "images")
    gallery = Collection(model, images=images, batch_size=batch_size, progress=progress)
    return gallery.search_images(text, check_top(k, len(images)), check_top(top_n, len(images), "top_n"), head)


def itm_scorer(model: BlipBase, feats: Tensor, texts: list[str]) -> Callable[[Tensor, Tensor], Tensor]:
    """A pair scorer for `rerank`: the ITM "match" logits of the pairs (feats[image_rows[n]], texts[text_rows[n]]).

    Pairs are grouped by image and go through `model.itm_logits` one image at a time, so each image's features and
    cross-attention keys / values are computed once however many of its pairs are scored.
    """

    @torch.no_grad()
    def score(image_rows: Tensor, text_rows: Tensor) -> Tensor:
        out = torch.empty(len(image_rows))
        order = image_rows.argsort(stable=True)
        groups = order.split(torch.bincount(image_rows, minlength=len(feats)).tolist())
        for i, at in enumerate(groups):
            if len(at):
                logits = model.itm_logits(feats[i : i + 1], [texts[t] for t in text_rows[at].tolist()])  # (1, n, 2)
                out[at] = logits[0, :, 1].float().cpu()
        return out

    return score
