"""Image-encoder pretraining on tags read from captions (`blipkit train --stage tags`).

BLIP starts from a ViT pretrained on image classification. A model trained from scratch has no such encoder, and
its ViT learns what is cheap first (colour) and what needs several patches (shape) very late, if ever, under the
image-text objectives alone. This stage gives the ViT a classification start without any labels beyond the captions:
the tags of an image are the words and adjacent word pairs ("red", "red circle") its captions use, kept when they
occur for at least `min_count` images and for at most `max_share` of them (so "a", "of" and "image" drop out), and
the ViT's `[CLS]` output learns to predict them (multi-label binary cross-entropy through a linear head). Word pairs
carry the binding of attributes to objects that single words lose. Where labels exist (object classes, or the boxes
of the generated scenes), `--tags FILE` uses them instead of the captions.

Where boxes exist, `--patch-labels` adds a dense objective: every patch token learns which object covers it (its shape,
its colour and which third of the image, across and down, holds its centre; or background), as a distribution over
classes in proportion to the patch's pixels each object covers, and its own row and column in the patch grid.
Sixty-four targets per image instead of one set of tags teach the patch tokens what and where each object is, which
captioning, grounding and the question encoder read from the patches. Shape and colour alone are the same wherever
an object sits: a ViT trained on them keeps little of where its patches are (the position embedding added at its
input fades), and questions like "where is the red circle?" stay at chance however long the later objectives train.
The row and column targets keep each patch's place in its output token. The `[CLS]` token learns how many objects
the image holds in all, of each shape, of each colour and of each colour and shape (a class per count, absent ones
zero): counts need the instances told apart, which the per-patch targets do not ask for when two objects of one
kind touch.

The stage trains the image encoder of a full BLIP model (built with `--arch`, its tokenizer built from the data, as
for BLIP training from scratch) and saves that model, so the next run continues from it with every objective:
`blipkit train --model OUT ...`. The tag head and the tag list are saved beside it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from tqdm import tqdm

from ..blip import Blip
from ..checkpoint import write_safetensors
from ..data.readers import Item
from ..data.scenes import SHAPES, draw_shape, swap_word
from ..errors import InputError
from .data import Sample, _key
from .loop import Recipe
from .losses import Objectives
from .vocab import words_in

TAG_HEAD_FILE = "tag_head.safetensors"
TAGS_FILE = "tags.json"
PATCH_LABELS_FILE = "patch_labels.json"
BACKGROUND = "background"
OBJECT_FIELDS = ("shape", "colour")  # what a boxes file names of each object
PATCH_FIELDS = (*OBJECT_FIELDS, "where")  # what each patch learns of the object covering it
# "where": the third of the image, across and down, that holds the object's centre
GRID_FIELDS = ("row", "column")  # what each patch learns of itself: its place in the patch grid
COUNT_FIELD, COUNT_VALUES = "count", "count_values"  # what the [CLS] token learns: the count of each kind (classes)
PLACES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")


def caption_tags(captions: Iterable[str]) -> set[str]:
    """Words and adjacent word pairs of the captions (BERT-normalised, lower case)."""
    tags: set[str] = set()
    for caption in captions:
        words = words_in(caption)
        tags.update(words)
        tags.update(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))
    return tags


def read_labels(path: str | Path) -> dict[str, set[str]]:
    """Tags given as labels: a JSON object {image: [tag, ...]} or list [{"image": ..., "tags": [...]}], or a scenes
    boxes file ([{"image", "objects": [{"colour", "shape", ...}]}]: each object's colour, shape and "colour shape").
    Image paths are as in the captions file (relative to the image root)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--tags {path}: cannot read a JSON file ({e})") from None
    if isinstance(data, dict):
        return {str(k): set(v) for k, v in data.items()}
    out = {}
    for n, entry in enumerate(data if isinstance(data, list) else []):
        if isinstance(entry, dict) and isinstance(entry.get("tags"), list):
            out[str(entry.get("image"))] = set(entry["tags"])
        elif isinstance(entry, dict) and isinstance(entry.get("objects"), list):
            out[str(entry.get("image"))] = {t for o in entry["objects"]
                                            for t in (o["colour"], o["shape"], f"{o['colour']} {o['shape']}")}
        else:
            raise InputError(f"--tags {path}: entry {n} has neither a 'tags' list nor 'objects'")
    if not out:
        raise InputError(f"--tags {path}: no labels (expected {{image: [tags]}} or a list of entries)")
    return out


def item_tags(items: list[Item], labels: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Each item's tags by key: from its captions, or from `labels` (an item without labels is an error)."""
    if labels is None:
        return {it.key: caption_tags(it.captions) for it in items}
    missing = [it.key for it in items if it.key not in labels]
    if missing:
        raise InputError(f"--tags: no labels for {len(missing)} of {len(items)} images (first: {missing[0]})")
    return {it.key: labels[it.key] for it in items}


def build_tags(items: list[Item], min_count: int = 20, max_share: float = 0.5,
               labels: dict[str, set[str]] | None = None, per_item: dict[str, set[str]] | None = None) -> list[str]:
    """The tag vocabulary of a dataset: tags used by at least `min_count` and at most `max_share` of the images
    (caption tags, or `labels`; labels are kept however common they are). `per_item`: `item_tags`, if computed."""
    per_item = item_tags(items, labels) if per_item is None else per_item
    counts = Counter(tag for tags in per_item.values() for tag in tags)
    if labels is not None:
        max_share = 1.0
    limit = max_share * len(items)
    tags = sorted(t for t, n in counts.items() if min_count <= n <= limit)
    if not tags:
        raise InputError(f"no caption word is used by at least {min_count} and at most {max_share:.0%} of the "
                         f"{len(items)} images; tags need more (or more varied) captions")
    return tags


def tag_targets(items: list[Item], tags: list[str], labels: dict[str, set[str]] | None = None,
                per_item: dict[str, set[str]] | None = None) -> dict[int, Tensor]:
    """Image key -> multi-hot float vector over `tags`. `per_item`: `item_tags`, if computed."""
    index = {t: i for i, t in enumerate(tags)}
    per_item = item_tags(items, labels) if per_item is None else per_item
    out = {}
    for it in items:
        target = torch.zeros(len(tags))
        for tag in per_item[it.key]:
            if tag in index:
                target[index[tag]] = 1.0
        out[_key(it.key)] = target
    return out


def read_boxes(path: str | Path, flag: str = "--patch-labels") -> dict[str, list[dict]]:
    """A scenes boxes file -> {image: objects}; each object needs "box_norm" ([x1, y1, x2, y2] in 0..1) and the
    `OBJECT_FIELDS`. Errors name the option (`flag`), the file and the entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: also bytes that are not UTF-8
        raise InputError(f"{flag} {path}: cannot read a JSON file ({e})") from None
    if not isinstance(data, list):
        raise InputError(f"{flag} {path}: expected a list of {{'image', 'objects'}} entries")
    out = {}
    for n, entry in enumerate(data):
        objects = entry.get("objects") if isinstance(entry, dict) else None
        if not isinstance(objects, list) or "image" not in entry:
            raise InputError(f"{flag} {path}: entry {n} needs 'image' and an 'objects' list")
        for o in objects:
            box = o.get("box_norm") if isinstance(o, dict) else None
            if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(o.get(f), str) for f in OBJECT_FIELDS)
                    or not 0 <= box[0] < box[2] <= 1 or not 0 <= box[1] < box[3] <= 1):
                raise InputError(f"{flag} {path}: entry {n} ({entry['image']}) has an object without "
                                 f"{', '.join(OBJECT_FIELDS)} and a box_norm [x1, y1, x2, y2] within 0..1: {o}")
        out[str(entry["image"])] = objects
    return out


def patch_classes(boxes: dict[str, list[dict]], grid: int | None = None) -> dict[str, list[str]]:
    """Each patch field's classes: background first, then the values the objects use, sorted (all nine `PLACES`
    for "where"); with `grid`, also "row" and "column" ("0" .. grid - 1)."""
    classes = {f: [BACKGROUND, *sorted({o[f] for objs in boxes.values() for o in objs})] for f in OBJECT_FIELDS}
    classes["where"] = [BACKGROUND, *PLACES]
    if grid is not None:
        classes.update({f: [str(i) for i in range(grid)] for f in GRID_FIELDS})
    return classes


def count_classes(boxes: dict[str, list[dict]]) -> dict[str, list[str]]:
    """The count head's classes: the kinds counted ("all", each shape, each colour, each "colour shape" the objects
    use) as `COUNT_FIELD` and the counts ("0" up to the most objects of one image) as `COUNT_VALUES`."""
    shapes = sorted({o["shape"] for objs in boxes.values() for o in objs})
    colours = sorted({o["colour"] for objs in boxes.values() for o in objs})
    most = max((len(objs) for objs in boxes.values()), default=0)
    return {COUNT_FIELD: ["all", *shapes, *colours, *(f"{c} {s}" for c in colours for s in shapes)],
            COUNT_VALUES: [str(n) for n in range(most + 1)]}


def count_targets(objects: list[dict], classes: dict[str, list[str]]) -> Tensor:
    """(kinds,) long tensor: how many of `objects` each kind of `count_classes` covers."""
    counts = Counter({"all": len(objects)})
    for o in objects:
        counts.update((o["shape"], o["colour"], f"{o['colour']} {o['shape']}"))
    return torch.tensor([counts[k] for k in classes[COUNT_FIELD]], dtype=torch.long)


def object_place(obj: dict) -> str:
    """The `PLACES` entry of the third, across and down, holding the centre of `obj`'s box_norm."""
    x1, y1, x2, y2 = obj["box_norm"]
    column, row = (min(int((a + b) / 2 * 3), 2) for a, b in ((x1, x2), (y1, y2)))
    return PLACES[3 * row + column]


def object_mask(obj: dict, side: int) -> np.ndarray:
    """(side, side) float mask of `obj` drawn at `side` pixels: the scenes shape where it is one, else its box."""
    x1, y1, x2, y2 = obj["box_norm"]
    box = [round(x1 * side), round(y1 * side), max(round(x2 * side), round(x1 * side) + 2),
           max(round(y2 * side), round(y1 * side) + 2)]
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if obj["shape"] in SHAPES:
        draw_shape(draw, obj["shape"], (255,), box)
    else:
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return np.asarray(mask, dtype=np.float32) / 255.0


def patch_targets(objects: list[dict], classes: dict[str, list[str]], grid: int, cell: int = 8) -> dict[str, Tensor]:
    """Field -> (grid * grid, classes) soft targets in row-major patch order: the share of each patch's pixels
    each class covers (objects drawn at `cell` pixels per patch), background taking the rest."""
    side = grid * cell
    out = {f: np.zeros((grid * grid, len(classes[f])), dtype=np.float32) for f in PATCH_FIELDS}
    for obj in objects:
        cover = object_mask(obj, side).reshape(grid, cell, grid, cell).mean(axis=(1, 3)).reshape(-1)
        values = {**{f: obj[f] for f in OBJECT_FIELDS}, "where": object_place(obj)}
        for f in PATCH_FIELDS:
            out[f][:, classes[f].index(values[f])] += cover
    for f in PATCH_FIELDS:
        target = out[f]
        target[:, 1:] = np.minimum(target[:, 1:], 1.0)
        target[:, 0] = np.clip(1.0 - target[:, 1:].sum(axis=1), 0.0, 1.0)
        target /= target.sum(axis=1, keepdims=True)
    return {f: torch.from_numpy(out[f]) for f in PATCH_FIELDS}


def add_patch_targets(batch: dict[str, Tensor], samples: list[Sample], patches: dict[int, dict[str, Tensor]]) -> None:
    """Each patch field's soft targets (`patch_targets` by image key) of the samples' images as "patch_{field}",
    and their counts (`count_targets`, when given as the `COUNT_FIELD` entry) as "counts"."""
    for f in PATCH_FIELDS:
        batch[f"patch_{f}"] = torch.stack([patches[s.image_key][f] for s in samples])
    if samples and COUNT_FIELD in patches[samples[0].image_key]:
        batch["counts"] = torch.stack([patches[s.image_key][COUNT_FIELD] for s in samples])


class TagCollate:
    """Samples -> {"pixels", "tags"}: the multi-hot tags of each sample's image, and with `patches` (image key ->
    `patch_targets`) each patch field's soft targets as "patch_{field}"."""

    def __init__(self, targets: dict[int, Tensor], patches: dict[int, dict[str, Tensor]] | None = None):
        self.targets, self.patches = targets, patches

    def __call__(self, samples: list[Sample]) -> dict[str, Tensor]:
        batch = {"pixels": torch.stack([s.pixels for s in samples]),
                 "tags": torch.stack([self.targets[s.image_key] for s in samples])}
        if self.patches is not None:
            add_patch_targets(batch, samples, self.patches)
        return batch


class PatchHeads(nn.ModuleDict):
    """A linear head per patch field (`patch_classes`) on the ViT's patch tokens and, with `count_classes`, a count
    head on its `[CLS]` token. `losses(states, batch)` (states: the ViT's output, `[CLS]` first): soft cross-entropy
    against "patch_{field}" for the object fields, for "row" and "column" cross-entropy against each patch's own
    place in the grid (row-major), and for the counts the mean over the kinds of the cross-entropy against "counts"."""

    def __init__(self, width: int, classes: dict[str, list[str]]):
        values = len(classes.get(COUNT_VALUES, ()))
        super().__init__({f: nn.Linear(width, len(c) * values if f == COUNT_FIELD else len(c))
                          for f, c in classes.items() if f != COUNT_VALUES})
        self.count_values = values

    def losses(self, states: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        patches = states[:, 1:]
        places = torch.arange(patches.shape[1], device=patches.device)
        for f, head in self.items():
            if f == COUNT_FIELD:
                logits = head(states[:, 0]).view(len(states), -1, self.count_values)
                out[COUNT_FIELD] = F.cross_entropy(logits.flatten(0, 1), batch["counts"].flatten())
                continue
            logits = head(patches)
            if f in GRID_FIELDS:
                grid = head.out_features
                target = (places // grid if f == "row" else places % grid).expand(len(patches), -1)
                out[f"patch_{f}"] = F.cross_entropy(logits.flatten(0, 1), target.flatten())
            else:
                logp = F.log_softmax(logits, dim=-1)
                out[f"patch_{f}"] = -(batch[f"patch_{f}"] * logp).sum(-1).mean()
        return out


class TagObjectives(nn.Module):
    """BLIP's ViT with a linear tag head on its `[CLS]` output and, given `patch_classes`, `PatchHeads` on the patch
    tokens; forward returns {"tags": BCE, "patch_{field}": ...}."""

    def __init__(self, model: Blip, num_tags: int, patch_classes: dict[str, list[str]] | None = None):
        super().__init__()
        self.model = model
        width = model.config.vision_config.hidden_size
        # PyTorch's default (uniform, +-1/sqrt(width)) start: with normal(0, 0.02) the ViT leaves its start-up
        # plateau hundreds of steps later (measured on the generated scenes)
        self.tag_head = nn.Linear(width, num_tags)
        self.patch_heads = PatchHeads(width, patch_classes or {})

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        states = self.model.vision_model(batch["pixels"])
        losses = {"tags": F.binary_cross_entropy_with_logits(self.tag_head(states[:, 0]), batch["tags"])}
        losses.update(self.patch_heads.losses(states, batch))
        return losses


class DenseObjectives(Objectives):
    """BLIP's objectives (`Objectives`) with the patch objectives of `PatchHeads` on the same image features, so
    that the image-text objectives do not wash out of the patch tokens what the tags stage taught them (where each
    patch is, what covers it)."""

    def __init__(self, model: Blip, objectives: tuple[str, ...], patch_classes: dict[str, list[str]]):
        super().__init__(model, objectives)
        self.patch_heads = PatchHeads(model.config.vision_config.hidden_size, patch_classes)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        feats = self.model.vision_model(batch["pixels"])
        out = self.from_features(feats, batch)
        out.update(self.patch_heads.losses(feats, batch))
        return out


class DenseCollate:
    """A BLIP batch (`collate`, a `Collate`) plus each patch field's soft targets ("patch_{field}") and, with
    `objects` (image key -> its boxes' objects), for each caption a variant false of its image ("false_rows",
    "false_ids", "false_mask": one colour, shape or number word swapped, `swap_word`), which ITM learns as a
    negative: a caption that names a colour with the wrong shape is the negative that teaches which colour goes
    with which shape."""

    def __init__(self, collate: Callable[[list[Sample]], dict[str, Tensor]], patches: dict[int, dict[str, Tensor]],
                 objects: dict[int, list[dict]] | None = None):
        self.collate, self.patches, self.objects = collate, patches, objects

    def __call__(self, samples: list[Sample]) -> dict[str, Tensor]:
        batch = self.collate(samples)
        add_patch_targets(batch, samples, self.patches)
        if false := self.false_captions(samples):
            ids, mask = self.collate.tokenizer([t for _, t in false], max_length=self.collate.max_length)
            batch["false_rows"] = torch.tensor([i for i, _ in false])
            batch["false_ids"], batch["false_mask"] = ids, mask
        return batch

    def false_captions(self, samples: list[Sample]) -> list[tuple[int, str]]:
        """(row, text) of each sample's caption made false of its image, where a word can be swapped so; the same
        samples give the same texts (drawn from each sample's seed). Empty without `objects`."""
        if self.objects is None:
            return []
        out = [(i, swap_word(s.caption, self.objects[s.image_key], random.Random(f"{s.seed}:false")))
               for i, s in enumerate(samples) if s.caption]
        return [(i, text) for i, text in out if text is not None]


def _patch_setup(model: Blip, items: list[Item], boxes: dict[str, list[dict]]):
    """(classes, image key -> `patch_targets`) of `items` from `boxes`; every item needs its boxes."""
    missing = [it.key for it in items if it.key not in boxes]
    if missing:
        raise InputError(f"--patch-labels: no boxes for {len(missing)} of {len(items)} images (first: {missing[0]})")
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    used = {it.key: boxes[it.key] for it in items}
    classes = {**patch_classes(used, grid), **count_classes(used)}
    patches = {_key(it.key): {**patch_targets(boxes[it.key], classes, grid),
                              COUNT_FIELD: count_targets(boxes[it.key], classes)}
               for it in tqdm(items, desc="patch labels", unit="img", leave=False)}
    return classes, patches


def load_patch_heads(heads: PatchHeads, classes: dict[str, list[str]], directory: str | Path) -> list[str]:
    """Start each of `heads` from the one a tags (or dense BLIP) run saved in `directory` when it used the same
    classes; returns the fields it started (the others keep their fresh start)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        saved = json.loads((directory / PATCH_LABELS_FILE).read_text())
        weights = load_file(directory / TAG_HEAD_FILE)
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict):
        return []
    loaded = []
    for f, head in heads.items():
        same = saved.get(f) == classes[f] and (f != COUNT_FIELD or saved.get(COUNT_VALUES) == classes[COUNT_VALUES])
        state = {k: weights.get(f"patch_heads.{f}.{k}") for k in head.state_dict()}
        if same and all(v is not None and v.shape == head.state_dict()[k].shape for k, v in state.items()):
            head.load_state_dict(state)
            loaded.append(f)
    return loaded


def _write_heads(directory: Path, heads: dict[str, Tensor], classes: dict[str, list[str]] | None) -> None:
    """The heads beside a saved model (`TAG_HEAD_FILE`) and, with patch heads, their classes (`PATCH_LABELS_FILE`)."""
    write_safetensors(heads, Path(directory) / TAG_HEAD_FILE)
    if classes is not None:
        (Path(directory) / PATCH_LABELS_FILE).write_text(json.dumps(classes, indent=1) + "\n")


def dense_blip_recipe(base: Recipe, items: list[Item], boxes: dict[str, list[dict]],
                      start: str | Path | None = None) -> Recipe:
    """BLIP training (`base`, a `blip_recipe`) with the patch objectives of `--patch-labels` kept on the image
    encoder, and ITM also learning each caption made false of its image by one swapped word (`DenseCollate`). The
    patch heads start from those a run saved in `start` (each whose classes match), else fresh; they are saved beside
    the model as a tags run saves them."""
    model = base.objectives.model
    classes, patches = _patch_setup(model, items, boxes)
    dense = DenseObjectives(model, base.objectives.objectives, classes)
    if start is not None:
        load_patch_heads(dense.patch_heads, classes, start)
    objects = {_key(it.key): boxes[it.key] for it in items}

    def write(directory: Path) -> None:
        base.save(directory)
        _write_heads(directory, {f"patch_heads.{k}": v for k, v in dense.patch_heads.state_dict().items()}, classes)

    return replace(base, objectives=dense, collate=DenseCollate(base.collate, patches, objects), save=write)


def tags_recipe(model: Blip, items: list[Item], min_count: int = 20, max_share: float = 0.5,
                labels: dict[str, set[str]] | None = None, boxes: dict[str, list[dict]] | None = None) -> Recipe:
    """The tags stage on the loop: trains `model.vision_model`; saves the whole model, the tag head (and patch heads)
    and the tags. `boxes` (`read_boxes`) adds the patch objectives."""
    from .. import save

    per_item = item_tags(items, labels)  # caption tags normalise every caption: once, for both uses
    tags = build_tags(items, min_count, max_share, labels, per_item)
    classes, patches = _patch_setup(model, items, boxes) if boxes is not None else (None, None)
    objectives = TagObjectives(model, len(tags), classes)

    def write(directory: Path) -> None:
        save(model, directory)
        _write_heads(directory, {k: v for k, v in objectives.state_dict().items() if not k.startswith("model.")},
                     classes)
        (Path(directory) / TAGS_FILE).write_text(json.dumps(tags, indent=0) + "\n")

    return Recipe(objectives, TagCollate(tag_targets(items, tags, labels, per_item), patches), model.processor,
                  write, find_unused_parameters=True)
