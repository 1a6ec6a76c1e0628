"""Metrics that know the scenes data: whether a caption's colour and shape words are true of the drawn objects, and
whether GradCAM points inside a named object's box."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..base import BlipBase
from ..data.scenes import COLOURS as SCENE_COLOURS
from ..data.scenes import SHAPES
from .metrics import words

COLOURS = tuple(SCENE_COLOURS)  # the scene generator's words
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}
_SKIPPABLE = {"small", "large", "one", "two", "three", "a", "an", "the"}


def caption_facts(caption: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(colour words, shape words, (colour, shape) pairs) a caption states; a colour pairs with the next shape word
    when only sizes, numbers or articles come between."""
    toks = words(caption)
    colours = [t for t in toks if t in COLOURS]
    shapes = [_SHAPE_WORDS[t] for t in toks if t in _SHAPE_WORDS]
    pairs = []
    for i, t in enumerate(toks):
        if t in COLOURS:
            j = i + 1
            while j < len(toks) and toks[j] in _SKIPPABLE:
                j += 1
            if j < len(toks) and toks[j] in _SHAPE_WORDS:
                pairs.append((t, _SHAPE_WORDS[toks[j]]))
    return colours, shapes, pairs


def colour_shape_accuracy(captions: Sequence[str], objects: Sequence[Sequence[dict]]) -> dict[str, float]:
    """Share of colour and shape words in `captions` that are true of the scene's objects.

    A colour (shape) word is true when some object has that colour (shape); when the caption pairs a colour with a
    shape ("red circle"), both words count as true only if one object has both. Also: the share of captions that
    state at least one colour or shape (`coverage`) and of captions whose every such word is true (`all_true`).
    """
    right = total = covered = all_true = 0
    for cap, objs in zip(captions, objects, strict=True):
        have = {(o["colour"], o["shape"]) for o in objs}
        colours, shapes, pairs = caption_facts(cap)
        paired_ok = Counter(w for c, s in pairs if (c, s) in have for w in (c, s))
        paired_bad = Counter(w for c, s in pairs if (c, s) not in have for w in (c, s))
        ok = 0
        for w in colours + shapes:
            if paired_bad[w] > 0:
                paired_bad[w] -= 1
            elif paired_ok[w] > 0:
                paired_ok[w] -= 1
                ok += 1
            elif w in {c for c, _ in have} or w in {s for _, s in have}:
                ok += 1
        n = len(colours) + len(shapes)
        right, total = right + ok, total + n
        covered += n > 0
        all_true += n > 0 and ok == n
    n = max(len(captions), 1)
    return {"colour_shape_acc": 100.0 * right / max(total, 1), "coverage": 100.0 * covered / n,
            "all_true": 100.0 * all_true / n}


def pointing_accuracy(
    model: BlipBase, images: list[Path], boxes: list[list[dict]], layer: int | None = None, source: str | None = None
) -> tuple[float, int]:
    """Share (percent) of uniquely named objects ("the red circle") whose GradCAM peak falls inside their box.

    Uses `blipkit.tasks.ground` (at cross-attention `layer`, from the map `source`; None: the model's defaults);
    returns (accuracy, number of phrases).
    """
    from ..tasks import ground

    hits = n = 0
    for image, objs in tqdm(list(zip(images, boxes, strict=True)), desc="eval/grounding", leave=False):
        names = Counter((o["colour"], o["shape"]) for o in objs)
        for o in objs:
            if names[(o["colour"], o["shape"])] != 1:
                continue
            x, y = ground(model, image, f"the {o['colour']} {o['shape']}", layer=layer, source=source).peak
            x1, y1, x2, y2 = o["box_norm"]
            hits += x1 <= x <= x2 and y1 <= y <= y2
            n += 1
    return 100.0 * hits / max(n, 1), n
