"""Seeded synthetic scenes of coloured shapes with true captions, questions and boxes, for training BLIP offline.

A scene holds one to three shapes (six shapes, eight colours, two sizes) whose boxes never overlap (they keep a
2-pixel gap), on a grey or pale-tinted background that is plain, a gradient or textured noise. Background pixels stay
within 105..225 in every channel, while every object colour has a channel outside that range, so no background pixel
ever has an object's colour. One scene in five has instead a plain light background (232..255 grey, white included, as
a page drawn on); those scenes hold no white object, so again no background pixel has the colour of an object.
Drawing is aliased: each object's pixels are exactly its colour.

Every caption and question is generated from the object list and is true of it:
- relations ("left of", "above", ...) compare box centres and need a difference of at least a tenth of the image side
  on that axis, and at least half the difference on the other axis; otherwise no relation is stated;
- positions ("on the left", "where is ...?" -> "left") need the centre in the outer third on one axis and the middle
  third on the other;
- a definite reference ("the red circle") is used only when it names one object (adding the size when that helps);
- counts use number words ("zero" .. "three") and yes/no questions come in yes-no pairs, so answers are balanced.

Boxes are ``[x1, y1, x2, y2]`` in pixels with exclusive ends (the shape's pixels lie in columns x1..x2-1 and touch
all four sides), and ``box_norm`` is the same divided by the image side.

On-disk layout written by `write_dataset` (image paths in the JSON files are relative to ``root``)::

    root/dataset.json                   manifest: seed, per-split seeds and counts, vocabulary, generator version
    root/images/{split}/{image_id:06d}.png
    root/annotations/{split}.json       [{"image", "caption": [str, ...], "image_id": int}], one entry per image
    root/annotations/{split}_vqa.json   [{"question_id", "image", "image_id", "question", "answer": [str],
                                          "question_type"}]
    root/annotations/{split}_boxes.json [{"image", "image_id", "width", "height", "background",
                                          "objects": [{"shape", "colour", "size", "box", "box_norm"}]}]
    root/annotations/train_web.json     with `web_noise`: [{"image", "caption": str, "image_id", "noise",
                                          "true_caption"}], captions as from the web (see `web_noise`)

Caption files hold one entry per image with its list of captions in every split (the layout of LAVIS's retrieval
val/test files); Karpathy-style training data with one caption per entry is a flattening of it. Each VQA answer list
holds the single correct answer, so score by exact match. Image ids are unique across splits and so are question ids
(``image_id * 100 + k``); each split draws from its own derived seed, and images are deduplicated across splits.

Speed (measured on one core of a 2-core machine, Pillow 12): `generate_split(10_000, seed=0, image_size=128)` takes
about 5.6 s (0.56 ms per scene); `write_dataset` with 10,000 + 500 + 500 images of 128 pixels takes about 16 s in
all, PNG encoding and writing included (about 6 KB per image).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from blipkit.errors import InputError

GENERATOR_VERSION = "1.1"

# Saturated or extreme colours: each has a channel below 105 or above 225, outside every background pixel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "white": (255, 255, 255),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "textured")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
SPLITS: tuple[str, ...] = ("train", "val", "test")

_SIZE_RANGE = {"small": (0.14, 0.20), "large": (0.28, 0.38)}  # box width as a fraction of the image side
_GAP = 2  # pixels kept between boxes and from the image border
_RELATION_MARGIN = 0.1  # centres must differ by this fraction of the image side to state a relation
_BG_RANGE = (105, 225)
_LIGHT_SHARE = 0.2  # scenes on a plain light grey or white background (and no white object)
_LIGHT_RANGE = (232, 255)
_BG_TINTS = ((0, 0, 0), (10, 5, -12), (-10, 0, 12), (-6, 10, -6), (10, -6, 8), (8, 8, -14))
_MIN_IMAGE_SIZE = 32


def _polygon(n: int, start_deg: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon (or n-pointed star when `inner` is set) on the unit circle."""
    k = 2 * n if inner else n
    points = []
    for i in range(k):
        r = inner if inner and i % 2 else 1.0
        a = math.radians(start_deg + 360.0 * i / k)
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


_RAW_POLYGONS = {
    "square": _polygon(4, -135),
    "triangle": _polygon(3, -90),
    "diamond": _polygon(4, -90),
    "star": _polygon(5, -90, inner=0.4),
    "hexagon": _polygon(6, 0),
}
_ASPECT = {"circle": 1.0}  # height / width of the undistorted shape
_UNIT_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {}  # vertices stretched to fill [0, 1] x [0, 1]
for _name, _pts in _RAW_POLYGONS.items():
    _xs, _ys = [p[0] for p in _pts], [p[1] for p in _pts]
    _w, _h = max(_xs) - min(_xs), max(_ys) - min(_ys)
    _ASPECT[_name] = _h / _w
    # rounded: a vertex at 0.9999999999999999 instead of 1 leaves the square's last row of pixels empty
    _UNIT_POLYGONS[_name] = tuple((round((x - min(_xs)) / _w, 9), round((y - min(_ys)) / _h, 9)) for x, y in _pts)


@dataclass(frozen=True)
class Obj:
    """One drawn shape: its words and its box (pixels, exclusive ends) and normalised box."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    box_norm: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        """Centre (x, y) of the box in pixels."""
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box),
                "box_norm": [round(v, 6) for v in self.box_norm]}


@dataclass
class Scene:
    """An image with true captions, question-answer pairs and its objects."""

    image: Image.Image
    captions: list[str]
    qa: list[tuple[str, str]]
    objects: list[Obj]
    background: str = "plain"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour_rgb: Sequence[int], box: Sequence[int]) -> None:
    """Draw `shape` filled with `colour_rgb` so that it spans `box` = [x1, y1, x2, y2] (exclusive ends) exactly."""
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise InputError(f"box {list(box)} is smaller than 2x2 pixels; give [x1, y1, x2, y2] with x2 > x1 + 1")
    fill = tuple(int(c) for c in colour_rgb)
    if shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        return
    w, h = x2 - 1 - x1, y2 - 1 - y1  # inclusive pixel span
    draw.polygon([(x1 + u * w, y1 + v * h) for u, v in _UNIT_POLYGONS[shape]], fill=fill, outline=fill)


# ----------------------------------------------------------------------------------------------------- geometry


def _relations(a: Obj, b: Obj, image_size: int) -> tuple[str | None, str | None]:
    """Clear (horizontal, vertical) relation of `a` to `b`: "left of"/"right of"/None, "above"/"below"/None."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay
    margin = _RELATION_MARGIN * image_size
    horizontal = vertical = None
    if abs(dx) >= margin and abs(dx) >= abs(dy) / 2:
        horizontal = "left of" if dx > 0 else "right of"
    if abs(dy) >= margin and abs(dy) >= abs(dx) / 2:
        vertical = "above" if dy > 0 else "below"
    return horizontal, vertical


def _position(obj: Obj, image_size: int) -> str | None:
    """Where `obj` sits in the image ("left", "right", "top", "bottom") when unambiguous, else None."""
    x, y = obj.centre
    lo, hi = image_size / 3, 2 * image_size / 3
    if lo <= y <= hi and (x < lo or x > hi):
        return "left" if x < lo else "right"
    if lo <= x <= hi and (y < lo or y > hi):
        return "top" if y < lo else "bottom"
    return None


def _near(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether boxes `a` and `b` overlap or come closer than the gap."""
    return a[0] < b[2] + _GAP and b[0] < a[2] + _GAP and a[1] < b[3] + _GAP and b[1] < a[3] + _GAP


def _find_box(rng: random.Random, image_size: int, shape: str, size: str, taken: list) -> tuple | None:
    """A box for a `size` `shape` clear of the `taken` boxes, or None after a bounded number of tries."""
    lo, hi = _SIZE_RANGE[size]
    for _ in range(50):
        w = max(3, round(image_size * rng.uniform(lo, hi)))
        h = max(3, round(w * _ASPECT[shape]))
        x1 = rng.randint(_GAP, image_size - _GAP - w)
        y1 = rng.randint(_GAP, image_size - _GAP - h)
        box = (x1, y1, x1 + w, y1 + h)
        if not any(_near(box, other) for other in taken):
            return box
    return None


def _pick_attributes(rng: random.Random, objs: list[Obj], colours: list[str]) -> tuple[str, str]:
    """Shape and colour (one of `colours`) of a new object; often shares one or both with an earlier object so counts
    and disambiguation get exercised."""
    if objs:
        ref, r = rng.choice(objs), rng.random()
        if r < 0.15:
            return ref.shape, ref.colour
        if r < 0.4:
            return ref.shape, rng.choice([c for c in colours if c != ref.colour])
        if r < 0.55:
            return rng.choice([s for s in SHAPES if s != ref.shape]), ref.colour
    return rng.choice(SHAPES), rng.choice(colours)


def _place_objects(rng: random.Random, image_size: int, colours: list[str]) -> list[Obj]:
    """One to three objects in `colours` with non-overlapping boxes."""
    n = rng.choices((1, 2, 3), weights=(1, 2, 2))[0]
    objs: list[Obj] = []
    for _ in range(n):
        shape, colour = _pick_attributes(rng, objs, colours)
        size = rng.choice(SIZES)
        box = _find_box(rng, image_size, shape, size, [o.box for o in objs])
        if box is None and size == "large":
            size = "small"
            box = _find_box(rng, image_size, shape, size, [o.box for o in objs])
        if box is not None:
            objs.append(Obj(shape, colour, size, box, tuple(v / image_size for v in box)))
    return objs


def _background_colour(rng: random.Random) -> np.ndarray:
    """A grey or pale tint."""
    return rng.randint(130, 200) + np.array(rng.choice(_BG_TINTS), dtype=np.float32)


def _background(rng: random.Random, image_size: int) -> tuple[Image.Image, str, bool]:
    """A plain, gradient or textured background whose pixels stay inside the background range, or (one in five) a
    plain light one; returns (image, kind, light)."""
    if rng.random() < _LIGHT_SHARE:
        return Image.new("RGB", (image_size, image_size), (rng.randint(*_LIGHT_RANGE),) * 3), "plain", True
    kind = rng.choice(BACKGROUNDS)
    base = _background_colour(rng)
    s = image_size
    if kind == "plain":
        arr = np.broadcast_to(base, (s, s, 3))
    elif kind == "gradient":
        t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None]  # (S, 1, 1)
        arr = np.broadcast_to(base * (1 - t) + _background_colour(rng) * t, (s, s, 3))
        if rng.random() < 0.5:
            arr = arr.transpose(1, 0, 2)
    else:
        np_rng = np.random.default_rng(rng.getrandbits(64))
        coarse = np_rng.normal(0.0, 10.0, (s // 8 + 1, s // 8 + 1)).astype(np.float32)
        blobs = np.asarray(Image.fromarray(coarse).resize((s, s), Image.Resampling.BILINEAR))
        grain = np_rng.normal(0.0, 5.0, (s, s)).astype(np.float32)
        arr = base + (blobs + grain)[:, :, None]  # grey texture over the tint, (S, S, 3)
    arr = np.clip(np.rint(arr), *_BG_RANGE).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr)), kind, False


# ----------------------------------------------------------------------------------------------------- language


def _a(phrase: str) -> str:
    """`phrase` with its indefinite article."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(parts: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _desc(obj: Obj, with_size: bool) -> str:
    """'red circle' or 'small red circle'."""
    return f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"


def _ref(obj: Obj, objs: list[Obj], rng: random.Random) -> str | None:
    """A colour-shape description naming `obj` alone in the scene (with its size when needed), else None."""
    same = [o for o in objs if (o.colour, o.shape) == (obj.colour, obj.shape)]
    if len(same) == 1:
        return _desc(obj, with_size=rng.random() < 0.3)
    if sum(o.size == obj.size for o in same) == 1:
        return _desc(obj, with_size=True)
    return None


_PREFIX_ONE = ("", "there is ", "an image of ", "a picture showing ", "a drawing of ")
_PREFIX_MANY = ("", "there are ", "an image of ", "a picture showing ", "a drawing of ")
_SUFFIXES = ("", "", " on a {bg} background", " in the picture")
# (template, takes a prefix) for "A left of B" and "A above B"
_LEFT = (("{A} left of {B}", True), ("{A} to the left of {B}", True), ("{B} to the right of {A}", True),
         ("{B} right of {A}", True), ("{A} is left of {B}", False), ("{B} is to the right of {A}", False))
_ABOVE = (("{A} above {B}", True), ("{B} below {A}", True), ("{A} is above {B}", False), ("{B} is below {A}", False))
_DIAGONAL = (("{A} above and to the left of {B}", True), ("{B} below and to the right of {A}", True))
_PLACES = {"left": ("on the left", "on the left side"), "right": ("on the right", "on the right side"),
           "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom")}


def _suffix(bg: str, rng: random.Random) -> str:
    return rng.choice(_SUFFIXES).format(bg=bg)


def _object_captions(objs: list[Obj], bg: str, rng: random.Random) -> list[str]:
    """'a red circle', 'small red circle', 'there is a red circle on a plain background', ..."""
    out = []
    for o in objs:
        for _ in range(3):
            d = _desc(o, with_size=rng.random() < 0.4)
            if rng.random() < 0.2:
                out.append(d)
            else:
                out.append(rng.choice(_PREFIX_ONE) + _a(d) + _suffix(bg, rng))
    return out


def _groups(objs: list[Obj]) -> dict[tuple[str, str], list[Obj]]:
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in objs:
        groups.setdefault((o.colour, o.shape), []).append(o)
    return groups


def _listing(objs: list[Obj], rng: random.Random) -> str:
    """Every object once: 'two red circles and a blue square'."""
    parts = []
    for (colour, shape), members in _groups(objs).items():
        if len(members) == 1:
            parts.append(_a(_desc(members[0], with_size=rng.random() < 0.3)))
        else:
            parts.append(f"{NUMBER_WORDS[len(members)]} {colour} {shape}s")
    rng.shuffle(parts)
    return _join(parts)


def _list_captions(objs: list[Obj], bg: str, rng: random.Random) -> list[str]:
    """The whole scene in one phrase, for scenes of two or more objects."""
    if len(objs) < 2:
        return []
    return [rng.choice(_PREFIX_MANY) + _listing(objs, rng) + _suffix(bg, rng) for _ in range(2)]


def _count_captions(objs: list[Obj], bg: str, rng: random.Random) -> list[str]:
    """'three shapes', 'two red circles', 'two circles', 'two blue shapes' (exact counts only)."""
    n = len(objs)
    total = f"{NUMBER_WORDS[n]} shape" + ("s" if n > 1 else "")
    out = [total, ("there are " if n > 1 else "there is ") + total + _suffix(bg, rng), f"an image of {total}"]
    if len(_groups(objs)) > 1:
        out.append(f"{total}: {_listing(objs, rng)}")
    prefix = rng.choice(("", "there are "))
    for (colour, shape), members in _groups(objs).items():
        if len(members) > 1:
            out.append(f"{prefix}{NUMBER_WORDS[len(members)]} {colour} {shape}s")
    for shape in dict.fromkeys(o.shape for o in objs):
        k = sum(o.shape == shape for o in objs)
        if k > 1:
            out.append(f"{prefix}{NUMBER_WORDS[k]} {shape}s")
    for colour in dict.fromkeys(o.colour for o in objs):
        k = sum(o.colour == colour for o in objs)
        if k > 1:
            out.append(f"{prefix}{NUMBER_WORDS[k]} {colour} shapes")
    return out


def _relation_captions(objs: list[Obj], image_size: int, rng: random.Random) -> list[str]:
    """'a small red circle left of a blue square', 'a blue square below a red circle', ... (clear relations only)."""
    out = []
    for a, b in combinations(objs, 2):
        ra, rb = _ref(a, objs, rng), _ref(b, objs, rng)
        if ra is None or rb is None:
            continue
        horizontal, vertical = _relations(a, b, image_size)
        names = {"A": _a(ra), "B": _a(rb)}
        lefty = dict(names) if horizontal == "left of" else {"A": names["B"], "B": names["A"]}
        upper = dict(names) if vertical == "above" else {"A": names["B"], "B": names["A"]}
        choices = []
        if horizontal:
            choices += [(t, p, lefty) for t, p in _LEFT]
        if vertical:
            choices += [(t, p, upper) for t, p in _ABOVE]
        if horizontal and vertical and lefty == upper:
            choices += [(t, p, lefty) for t, p in _DIAGONAL]
        for template, prefixed, slots in rng.sample(choices, min(2, len(choices))):
            text = template.format(**slots)
            out.append(rng.choice(_PREFIX_ONE) + text if prefixed else text)
    return out


def _position_captions(objs: list[Obj], image_size: int, rng: random.Random) -> list[str]:
    """'a red circle on the left', 'there is a blue square at the bottom', ..."""
    out = []
    for o in objs:
        place, ref = _position(o, image_size), _ref(o, objs, rng)
        if place and ref:
            out.append(rng.choice(_PREFIX_ONE) + _a(ref) + " " + rng.choice(_PLACES[place]))
    return out


def _captions(objs: list[Obj], bg: str, image_size: int, rng: random.Random, n: int) -> list[str]:
    """Up to `n` distinct true captions, drawn in turn from each kind (object, list, count, relation, position)."""
    pools = [_object_captions(objs, bg, rng), _list_captions(objs, bg, rng), _count_captions(objs, bg, rng),
             _relation_captions(objs, image_size, rng), _position_captions(objs, image_size, rng)]
    pools = [list(dict.fromkeys(p)) for p in pools if p]
    rng.shuffle(pools)
    chosen: dict[str, None] = {}
    while len(chosen) < n and any(pools):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen[pool.pop(rng.randrange(len(pool)))] = None
    return list(chosen)


def draw_captions(entry: dict, rng: random.Random, n: int = 5) -> list[str]:
    """The captions the generator would draw with `rng` for a scene of a boxes file (`entry`: "objects",
    "background", "width"), as `generate_scene` draws them: how likely each true caption is to be listed."""
    objs = [Obj(o["shape"], o["colour"], o["size"], tuple(o["box"]), tuple(o["box_norm"])) for o in entry["objects"]]
    return _captions(objs, entry["background"], entry["width"], rng, n)


def _questions(objs: list[Obj], image_size: int, rng: random.Random) -> list[tuple[str, str]]:
    """Question-answer pairs whose answers are unambiguous in the scene: about each object, one count, yes/no pairs."""
    qa = [pair for o in objs for pair in _object_questions(o, objs, image_size, rng)]
    qa += _count_questions(objs, rng)
    return qa + _yes_no_questions(objs, rng, asked={q for q, _ in qa})


def _object_questions(o: Obj, objs: list[Obj], image_size: int, rng: random.Random) -> list[tuple[str, str]]:
    """Colour, shape, position and size questions about `o`, each only when the scene makes its answer unique."""
    qa: list[tuple[str, str]] = []
    same_shape = [p for p in objs if p.shape == o.shape]
    if len(same_shape) == 1 or sum(p.size == o.size for p in same_shape) == 1:
        noun = f"{o.size} {o.shape}" if len(same_shape) > 1 or rng.random() < 0.3 else o.shape
        form = rng.choice(("what color is the {}?", "what is the color of the {}?", "which color is the {}?"))
        qa.append((form.format(noun), o.colour))
    same_colour = [p for p in objs if p.colour == o.colour]
    if len(same_colour) == 1 or sum(p.size == o.size for p in same_colour) == 1:
        noun = f"{o.size} {o.colour}" if len(same_colour) > 1 or rng.random() < 0.3 else o.colour
        form = rng.choice(("what shape is the {} object?", "what is the shape of the {} object?",
                           "what is the {} shape?"))
        qa.append((form.format(noun), o.shape))
    ref = _ref(o, objs, rng)
    if ref is not None:
        place = _position(o, image_size)
        if place is not None:
            qa.append((rng.choice(("where is the {}?", "where is the {} located?")).format(ref), place))
        if rng.random() < 0.3 and sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs) == 1:
            qa.append((f"what size is the {o.colour} {o.shape}?", o.size))  # the reference must not say the size
    return qa


def _count_questions(objs: list[Obj], rng: random.Random) -> list[tuple[str, str]]:
    """How many objects there are, and how many of one shape, colour or colour-and-shape (sometimes an absent one)."""
    qa = [(rng.choice(("how many shapes are there?", "how many objects are there?",
                       "how many objects are in the image?")), NUMBER_WORDS[len(objs)])]
    present_shapes = [o.shape for o in objs]
    present_colours = [o.colour for o in objs]
    kind = rng.choice(("shape", "colour", "colour shape"))
    if kind == "shape":
        shape = rng.choice(present_shapes) if rng.random() < 0.6 else rng.choice(SHAPES)
        qa.append((f"how many {shape}s are there?", NUMBER_WORDS[present_shapes.count(shape)]))
    elif kind == "colour":
        colour = rng.choice(present_colours) if rng.random() < 0.6 else rng.choice(list(COLOURS))
        qa.append((f"how many {colour} objects are there?", NUMBER_WORDS[present_colours.count(colour)]))
    else:
        o = rng.choice(objs)
        k = sum((p.colour, p.shape) == (o.colour, o.shape) for p in objs)
        qa.append((f"how many {o.colour} {o.shape}s are there?", NUMBER_WORDS[k]))
    return qa


def _yes_no_questions(objs: list[Obj], rng: random.Random, asked: set[str]) -> list[tuple[str, str]]:
    """One or two yes/no pairs (one yes, one no of the same form, so the answers stay balanced) not yet `asked`."""
    present = {(o.colour, o.shape) for o in objs}
    present_shapes = [o.shape for o in objs]
    present_colours = [o.colour for o in objs]
    qa: list[tuple[str, str]] = []
    for _ in range(rng.choice((1, 2))):
        form = rng.choice(("colour shape", "shape", "colour"))
        if form == "colour shape":
            yes = rng.choice(sorted(present))
            near_misses = [(c, s) for c in COLOURS for s in SHAPES
                           if (c, s) not in present and (c in present_colours or s in present_shapes)]
            no = rng.choice(near_misses)
            template = rng.choice(("is there {}?", "is there {} in the image?", "does the image contain {}?"))
            pair = [(template.format(_a(f"{c} {s}")), answer) for (c, s), answer in ((yes, "yes"), (no, "no"))]
        elif form == "shape":
            yes_s = rng.choice(present_shapes)
            no_s = rng.choice([s for s in SHAPES if s not in present_shapes])
            template = rng.choice(("is there {}?", "are there any {}s?"))
            pair = [(template.format(_a(s) if template.startswith("is") else s), answer)
                    for s, answer in ((yes_s, "yes"), (no_s, "no"))]
        else:
            yes_c = rng.choice(present_colours)
            no_c = rng.choice([c for c in COLOURS if c not in present_colours])
            template = rng.choice(("is there {} object?", "are there any {} shapes?"))
            pair = [(template.format(_a(c) if template.startswith("is") else c), answer)
                    for c, answer in ((yes_c, "yes"), (no_c, "no"))]
        if not any(q in asked for q, _ in pair):
            rng.shuffle(pair)
            qa.extend(pair)
            asked.update(q for q, _ in pair)
    return qa


def question_type(question: str) -> str:
    """The kind of a generated question: "color", "shape", "size", "count", "position" or "yes/no"."""
    q = question.lower()
    if q.startswith("how many"):
        return "count"
    if q.startswith("where"):
        return "position"
    if q.startswith(("is there", "are there", "does")):
        return "yes/no"
    if q.startswith("what size"):
        return "size"
    return "color" if "color" in q else "shape"


# ----------------------------------------------------------------------------------------------------- scenes


def _check_image_size(image_size: int) -> None:
    if image_size < _MIN_IMAGE_SIZE:
        raise InputError(f"image_size={image_size} is too small for legible shapes; use {_MIN_IMAGE_SIZE} or more")


def generate_scene(rng: random.Random, image_size: int = 128, n_captions: int = 5) -> Scene:
    """One random scene drawn with `rng` (a `random.Random`): image, true captions, question-answer pairs, objects."""
    _check_image_size(image_size)
    image, background, light = _background(rng, image_size)
    objs = _place_objects(rng, image_size, [c for c in COLOURS if not (light and c == "white")])
    draw = ImageDraw.Draw(image)
    for o in objs:
        draw_shape(draw, o.shape, COLOURS[o.colour], o.box)
    captions = _captions(objs, background, image_size, rng, n_captions)
    qa = _questions(objs, image_size, rng)
    return Scene(image=image, captions=captions, qa=qa, objects=objs, background=background)


def iter_scenes(n: int, seed: int, image_size: int = 128, n_captions: int = 5,
                seen: set[bytes] | None = None) -> Iterator[Scene]:
    """Yield `n` scenes with pairwise distinct images from `seed`, skipping any image whose digest is in `seen`."""
    if n < 0:
        raise InputError(f"n={n} scenes: give a count of zero or more")
    _check_image_size(image_size)
    rng = random.Random(seed)
    seen = set() if seen is None else seen
    made = 0
    while made < n:
        scene = generate_scene(rng, image_size, n_captions)
        digest = hashlib.blake2b(scene.image.tobytes(), digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        made += 1
        yield scene


def generate_split(n: int, seed: int, image_size: int = 128, n_captions: int = 5) -> list[Scene]:
    """`n` scenes from `seed`; the same arguments give byte-identical images and identical texts."""
    return list(iter_scenes(n, seed, image_size, n_captions))


def split_seed(seed: int, split: str) -> int:
    """The seed of `split` derived from the dataset `seed` (stable across runs, platforms and Python versions)."""
    digest = hashlib.sha256(f"blipkit.data.scenes:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")


def write_dataset(root: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0, image_size: int = 128,
                  progress: bool = True, n_captions: int = 5, web_noise: tuple[float, float] | None = None) -> dict:
    """Write the train/val/test splits as PNG images plus caption, VQA and box JSON files; returns the manifest.

    `web_noise=(mismatched, partial)` also writes `annotations/train_web.json`, one noisy caption per training image
    labelled with its noise (see `web_noise`).
    """
    _check_image_size(image_size)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    seen: set[bytes] = set()  # image digests of every split so far, keeping the splits disjoint
    next_id = 0
    for split, n in counts.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        captions, vqa, boxes = [], [], []
        scenes = iter_scenes(n, split_seed(seed, split), image_size, n_captions, seen)
        for scene in tqdm(scenes, total=n, desc=f"scenes/{split}", unit="img", disable=not progress):
            image_id, next_id = next_id, next_id + 1
            rel = f"images/{split}/{image_id:06d}.png"
            scene.image.save(root / rel, format="PNG", compress_level=1)
            captions.append({"image": rel, "caption": list(scene.captions), "image_id": image_id})
            vqa += [{"question_id": image_id * 100 + k, "image": rel, "image_id": image_id, "question": q,
                     "answer": [a], "question_type": question_type(q)} for k, (q, a) in enumerate(scene.qa)]
            boxes.append({"image": rel, "image_id": image_id, "width": image_size, "height": image_size,
                          "background": scene.background, "objects": [o.to_dict() for o in scene.objects]})
        _write_json(root / "annotations" / f"{split}.json", captions)
        _write_json(root / "annotations" / f"{split}_vqa.json", vqa)
        _write_json(root / "annotations" / f"{split}_boxes.json", boxes)

    manifest = {
        "name": "blipkit-scenes",
        "generator": "blipkit.data.scenes",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "captions_per_image": n_captions,
        "splits": {s: {"count": n, "seed": split_seed(seed, s), "captions": f"annotations/{s}.json",
                       "vqa": f"annotations/{s}_vqa.json", "boxes": f"annotations/{s}_boxes.json",
                       "images": f"images/{s}"} for s, n in counts.items()},
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "backgrounds": list(BACKGROUNDS),
        "numbers": list(NUMBER_WORDS),
        "box_format": "[x1, y1, x2, y2] pixels, exclusive ends; box_norm divides by the image side",
        "caption_format": "one entry per image with a list of captions (LAVIS retrieval layout)",
    }
    if web_noise is not None:
        path = write_web_noise(root, *web_noise, split="train", seed=seed)
        manifest["splits"]["train"]["web"] = str(path.relative_to(root))
        manifest["web_noise"] = {"mismatched": web_noise[0], "partial": web_noise[1], "per_image": 1}
    _write_json(root / "dataset.json", manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------- web noise

NOISE_LABELS: tuple[str, ...] = ("clean", "mismatched", "partial")
_SHAPE_NOUNS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}
_GENERIC_NOUNS = ("shape", "shapes", "object", "objects")


def _pairs(words: list[str]) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names ("red circle", "two red circles")."""
    return {(a, _SHAPE_NOUNS[b]) for a, b in zip(words[:-1], words[1:], strict=True)
            if a in COLOURS and b in _SHAPE_NOUNS}


def swap_word(caption: str, objs: list[dict], rng: random.Random) -> str | None:
    """`caption` with one colour, shape or number word swapped so that it is false of `objs`, or None when none can.

    The scenes grammar always writes "[size] colour shape", so a colour before a shape is false when no object has the
    new (colour, shape) pair; a colour before "shapes"/"objects", or a shape without a colour, when no object has the
    new colour or shape at all; a number word when it no longer matches how many objects there are.
    """
    words = caption.split(" ")
    have = {(o["colour"], o["shape"]) for o in objs}
    colours, shapes = {c for c, _ in have}, {s for _, s in have}
    options: list[tuple[int, str]] = []
    for i, w in enumerate(words):
        after = words[i + 1] if i + 1 < len(words) else ""
        before = words[i - 1] if i else ""
        if w in COLOURS and after in _SHAPE_NOUNS:
            options += [(i, c) for c in COLOURS if (c, _SHAPE_NOUNS[after]) not in have]
        elif w in COLOURS and after in _GENERIC_NOUNS:
            options += [(i, c) for c in COLOURS if c not in colours]
        elif w in _SHAPE_NOUNS and before in COLOURS:
            options += [(i, s + w[len(_SHAPE_NOUNS[w]):]) for s in SHAPES if (before, s) not in have]
        elif w in _SHAPE_NOUNS:
            options += [(i, s + w[len(_SHAPE_NOUNS[w]):]) for s in SHAPES if s not in shapes]
    if not options:  # e.g. "three shapes": another count of all the objects is false
        options = [(i, n) for i, w in enumerate(words) if w in NUMBER_WORDS and words[i + 1:i + 2] in (["shapes"],
                   ["shape"]) for n in NUMBER_WORDS[1:] if n not in (w, NUMBER_WORDS[len(objs)])]
    if not options:
        return None
    i, word = rng.choice(options)
    if words[i] in NUMBER_WORDS:  # keep the plural in agreement: "one shape", "two shapes"
        words[i + 1] = "shape" if word == "one" else "shapes"
    words[i] = word
    if i and words[i - 1] in ("a", "an"):  # "an orange circle" -> "a purple circle"
        words[i - 1] = _a(word).split(" ")[0]
    return " ".join(words)


def web_noise(captions: list[dict], boxes: list[dict], mismatched: float, partial: float, seed: int = 0,
              per_image: int = 1) -> list[dict]:
    """Captions as they come from the web: a share replaced by another image's caption, a share partly wrong.

    Takes a split's caption and box entries (`annotations/{split}.json`, `{split}_boxes.json`) and returns one entry
    per caption, the first `per_image` captions of each image (Karpathy layout, what `blipkit train` and
    `blipkit capfilt` read): `{"image", "caption", "image_id", "noise", "true_caption"}`, where `noise` is "clean",
    "mismatched" (another image's caption naming a colour-shape pair this image does not have) or "partial" (one
    colour, shape or number word swapped so that the caption is false). Every caption labelled noisy is false of its
    image; each label is drawn independently with the given probabilities (seeded).
    """
    for name, share in (("mismatched", mismatched), ("partial", partial)):
        if not (isinstance(share, (int, float)) and 0 <= share <= 1):
            raise InputError(f"{name}={share!r}: give a share between 0 and 1")
    if mismatched + partial > 1:
        raise InputError(f"mismatched={mismatched} + partial={partial} exceed 1: the shares are of the same captions")
    if not isinstance(per_image, int) or per_image < 1:
        raise InputError(f"per_image={per_image!r}: give 1 or more captions per image")
    objects = {b["image"]: b["objects"] for b in boxes}
    missing = [c["image"] for c in captions if c["image"] not in objects]
    if missing:
        raise InputError(f"image {missing[0]} has captions but no boxes: pass the same split's boxes")
    rng = random.Random(seed)
    pool = [(c["image"], t) for c in captions for t in c["caption"]]
    out = []
    for entry in captions:
        objs = objects[entry["image"]]
        have = {(o["colour"], o["shape"]) for o in objs}
        for text in entry["caption"][:per_image]:
            r, noise, noisy = rng.random(), "clean", text
            if r < mismatched:
                for _ in range(100):  # another image's caption that names a pair this image lacks: false here
                    other, candidate = rng.choice(pool)
                    if other != entry["image"] and _pairs(candidate.split(" ")) - have:
                        noise, noisy = "mismatched", candidate
                        break
            elif r < mismatched + partial and (swapped := swap_word(text, objs, rng)) is not None:
                noise, noisy = "partial", swapped
            out.append({"image": entry["image"], "caption": noisy, "image_id": entry.get("image_id"), "noise": noise,
                        "true_caption": text})
    return out


def write_web_noise(root: str | Path, mismatched: float = 0.3, partial: float = 0.2, split: str = "train",
                    seed: int = 0, per_image: int = 1) -> Path:
    """Write `annotations/{split}_web.json` (see `web_noise`) into a scenes dataset directory; returns its path."""
    root = Path(root)
    ann = root / "annotations"
    try:
        captions = json.loads((ann / f"{split}.json").read_text())
        boxes = json.loads((ann / f"{split}_boxes.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{root}: cannot read split '{split}' of a scenes dataset ({e}); write it first with "
                         "write_dataset") from None
    out = ann / f"{split}_web.json"
    _write_json(out, web_noise(captions, boxes, mismatched, partial, seed, per_image))
    return out
