"""Image-text matching over the pairs of many images in one pass: image i with its own texts `texts[i]`.

`match(images, texts)` scores every image against every text, one image at a time: each image's cross-attention
keys/values are computed once and shared by its texts. `match_pairs(images, texts)` gives each image its own list of
texts (of any lengths) and puts the pairs of all the images through the text stack together, in a few passes of
texts of similar length. Each pair (row) reads the keys/values of its own image, computed once per image: shared by
the image's rows when every image of a pass has as many, else copied per row. Many images with a few texts each (a
server's batch of requests) then cost about one call instead of one each, with the same results.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .base import ImageInput, TextInput, text_list
from .errors import InputError

LayerKV = tuple[Tensor, Tensor] | None
KV_BUDGET = 256 << 20  # bytes of per-pair keys/values one pass may gather


class PairMatching:
    """`match_pairs` for a model family whose `_itm_pairs(feats, image, texts)` scores texts[r] with image[r]."""

    @torch.inference_mode()
    def match_pairs(self, images: ImageInput | Tensor, texts: Sequence[TextInput]) -> list[Tensor]:
        """ITM match probability of image i with each of its own texts `texts[i]`: one (len(texts[i]),) per image.

        Equals `match(image_i, texts[i])[0]` for each image, but the pairs of all the images go through the text
        stack together, so many images with a few texts each cost about one call.
        """
        logits, counts = self.forward_itm_pairs(images, texts)
        return list(logits.float().softmax(dim=-1)[:, 1].split(counts))

    def forward_itm_pairs(self, images: ImageInput | Tensor, texts: Sequence[TextInput]) -> tuple[Tensor, list[int]]:
        """ITM logits (Npairs, 2) of image i with each text of `texts[i]`, image by image, and each image's count."""
        self.require("itm")
        flat, counts = pair_texts(texts)
        feats = self._feats(images)
        return self._itm_pairs(feats, pair_index(counts, feats.shape[0], feats.device), flat), counts


def pair_texts(texts: Sequence[TextInput]) -> tuple[list[str], list[int]]:
    """`texts[i]`, the texts of image i (a string or a list of strings) -> all the texts in order, and their counts."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InputError(f"texts must be a list with the texts of each image (texts[i] goes with image i), "
                         f"got {type(texts).__name__}")
    if not texts:
        raise InputError("no texts given (empty list): give a list of texts for each image")
    flat: list[str] = []
    counts: list[int] = []
    for i, group in enumerate(texts):
        items = text_list(group, f"texts of image {i}", f"image {i}'s text")
        flat += items
        counts.append(len(items))
    return flat, counts


def pair_index(counts: list[int], images: int, device: torch.device) -> Tensor:
    """The image of each pair (sum(counts),), after checking there is one list of texts per image."""
    if len(counts) != images:
        raise InputError(f"got {len(counts)} lists of texts for {images} images: give one list per image "
                         "(texts[i] goes with image i)")
    return torch.repeat_interleave(torch.arange(images, device=device), torch.tensor(counts, device=device))


def pair_kv(kv: list[LayerKV], image: Tensor) -> list[LayerKV]:
    """Per-layer cross-attention keys/values (Ni, nh, P, hs) of the images -> those the rows of one pass read.

    `image` (n,) is the image of each row of the pass, an image's rows together (see `pair_chunks`). When every
    image of the pass has the same number of rows G, each image's keys/values are shared by its run of G rows
    (`layers.attend` folds the run into one attention call): no copies. Otherwise each row gets a copy of its image's.
    """
    present, counts = image.unique_consecutive(return_counts=True)
    if bool((counts == counts[0]).all()):
        if len(present) == next(x[0].shape[0] for x in kv if x is not None):
            return kv  # every image, in order
        return [None if x is None else (x[0].index_select(0, present), x[1].index_select(0, present)) for x in kv]
    return [None if x is None else (x[0].index_select(0, image), x[1].index_select(0, image)) for x in kv]


def pair_chunks(lengths: Tensor, kv: list[LayerKV], most: int) -> Iterator[Tensor]:
    """Row indices of the pairs for each pass, longest texts first; each pass pads to its own longest text.

    A pass takes at most `most` rows, at most `KV_BUDGET` bytes of gathered keys/values, and only texts longer than half
    its longest: padding less than doubles any text's work, and short and long texts together take a few passes.
    """
    per_pair = sum(2 * x[0][0].numel() * x[0].element_size() for x in kv if x is not None)
    step = max(1, min(most, KV_BUDGET // max(per_pair, 1)))
    order = lengths.sort(descending=True, stable=True).indices
    ordered = lengths[order].tolist()
    start = 0
    for r in range(1, len(order) + 1):
        if r == len(order) or r - start == step or 2 * ordered[r] <= ordered[start]:
            yield order[start:r].sort().values  # pairs are numbered image by image: an image's rows stay together
            start = r
