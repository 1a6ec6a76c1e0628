"""What the tasks share: batched encoding with a progress bar, ITC / ITM scores for both families, capability checks
(through the models' capability tables: `model.can`, `model.require`).

Everything here calls the models' public methods (`encode_images`, `encode_texts`, `itm_logits`, ...), so it works for
BLIP and BLIP-2 alike. BLIP-2 image embeddings are (N, Q, D), one per query token; ITC scores take the max over the
queries, as BLIP-2's `similarity` does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import BlipBase, text_list
from ..errors import InputError
from ..generate import check_int, check_real

PROGRESS_MIN = 16  # a progress bar appears from this many items on (when `progress` is left at None)
ITC_TEMPERATURE = 0.07  # BLIP's and BLIP-2's initial ITC temperature, used when the model carries none


def has_itc(model: BlipBase) -> bool:
    """Whether the model computes ITC embeddings (its family's capability table says "itc")."""
    return model.can("itc")


def has_itm(model: BlipBase) -> bool:
    """Whether the model scores pairs with an ITM head (capability "itm")."""
    return model.can("itm")


def require_head(model: BlipBase, head: str, what: str) -> None:
    """Raise CapabilityError when the model cannot use `head` ("itc" or "itm"), naming the checkpoints that can."""
    check_choice(head, ("itc", "itm"), "head")
    model.require(head, what)


def check_choice(value: str, choices: Sequence[str], name: str) -> None:
    """InputError unless `value` is one of `choices`."""
    if value not in choices:
        raise InputError(f"{name}={value!r}: use one of {', '.join(repr(c) for c in choices)}")


def check_nonempty(items: Sequence[Any], what: str) -> None:
    """InputError when a list the caller gave is empty."""
    if len(items) == 0:
        raise InputError(f"no {what} given: pass at least one")


def temperature(model: BlipBase, value: float | None = None) -> float:
    """The ITC temperature: `value` if given, else the model's learned `temp` if it has one, else 0.07."""
    if value is not None:
        return check_real("temperature", value, 0.0, low_open=True)
    temp = getattr(model, "temp", None)
    return float(temp) if isinstance(temp, Tensor) and temp.numel() == 1 else ITC_TEMPERATURE


def batched(items: Sequence[Any], size: int, progress: bool | None = None, desc: str = "") -> Iterator[list[Any]]:
    """Consecutive slices of `items` of at most `size`, with a progress bar on stderr for long inputs."""
    from tqdm import tqdm

    size = check_int("batch_size", size, 1)
    show = len(items) >= PROGRESS_MIN if progress is None else progress
    with tqdm(total=len(items), desc=desc, unit="item", disable=not show, file=sys.stderr, leave=False) as bar:
        for start in range(0, len(items), size):
            chunk = list(items[start : start + size])
            yield chunk
            bar.update(len(chunk))


def check_top(k: int | None, n: int, name: str = "k") -> int:
    """How many results to keep: `k` (an integer >= 1, at most `n` kept) or all `n` when None."""
    return n if k is None else min(check_int(name, k, 1), n)


def texts_of(texts: Any, what: str, item: str) -> list[str]:
    """A string or a list / tuple of strings, each checked (`base.text_list`), with outer whitespace removed."""
    return [t.strip() for t in text_list(texts, what, item)]


def as_items(x: Any) -> list[Any]:
    """One image / text, or a sequence of them, -> list ((N, 3, H, W) tensors become N items)."""
    if isinstance(x, Tensor):
        return list(x) if x.dim() == 4 else [x]
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


@torch.no_grad()
def encode_images(model: BlipBase, images: Any, batch_size: int = 32, progress: bool | None = None) -> Tensor:
    """ITC image embeddings in batches: (N, D) for BLIP, (N, Q, D) for BLIP-2."""
    require_head(model, "itc", "encode images")
    items = as_items(images)
    check_nonempty(items, "images")
    return torch.cat([model.encode_images(b).float() for b in batched(items, batch_size, progress, "images")])


@torch.no_grad()
def encode_texts(model: BlipBase, texts: str | Sequence[str], batch_size: int = 256) -> Tensor:
    """ITC text embeddings (N, D) in batches."""
    require_head(model, "itc", "encode texts")
    items = as_items(texts)
    check_nonempty(items, "texts")
    return torch.cat([model.encode_texts(b).float() for b in batched(items, batch_size, False)])


def itc_scores(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Cosine similarity (Ni, Nt) of embeddings; BLIP-2's per-query image embeddings take the max over queries."""
    if image_emb.dim() == 3:  # (Ni, Q, D)
        return torch.einsum("iqd,td->iqt", image_emb, text_emb).amax(dim=1)
    return image_emb @ text_emb.t()


@torch.no_grad()
def itm_logits(
    model: BlipBase, images: Any, texts: str | Sequence[str], batch_size: int = 32, progress: bool | None = None
) -> Tensor:
    """ITM logits (Ni, Nt, 2) of every pair, images in batches; index 1 is "match"."""
    require_head(model, "itm", "match images and texts")
    items, texts = as_items(images), as_items(texts)
    check_nonempty(items, "images")
    check_nonempty(texts, "texts")
    rows = [model.itm_logits(b, texts).float() for b in batched(items, batch_size, progress, "images")]
    return torch.cat(rows)


def match_probs(logits: Tensor) -> Tensor:
    """ITM logits (..., 2) -> match probabilities (...)."""
    return logits.softmax(dim=-1)[..., 1]
