"""Image-encoder pretraining on tags read from captions (`blipkit train --stage tags`).

BLIP starts from a ViT pretrained on image classification. A model trained from scratch has no such encoder, and
its ViT learns what is cheap first (colour) and what needs several patches (shape) very late, if ever, under the
image-text objectives alone. This stage gives the ViT a classification start without any labels beyond the captions:
the tags of an image are the words and adjacent word pairs ("red", "red circle") its captions use, kept when they
occur for at least `min_count` images and for at most `max_share` of them (so "a", "of" and "image" drop out), and
the ViT's `[CLS]` output learns to predict them (multi-label binary cross-entropy through a linear head). Word pairs
carry the binding of attributes to objects that single words lose. Where labels exist (object classes, or the boxes
of the generated scenes), `--tags FILE` uses them instead of the captions.

The stage trains the image encoder of a full BLIP model (built with `--arch`, its tokenizer built from the data, as
for BLIP training from scratch) and saves that model, so the next run continues from it with every objective:
`blipkit train --model OUT ...`. The tag head and the tag list are saved beside it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blip import Blip
from ..checkpoint import write_safetensors
from ..errors import InputError
from .data import Item, Sample, _key
from .loop import Recipe
from .vocab import words_in

TAG_HEAD_FILE = "tag_head.safetensors"
TAGS_FILE = "tags.json"


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


class TagCollate:
    """Samples -> {"pixels", "tags"}: the multi-hot tags of each sample's image."""

    def __init__(self, targets: dict[int, Tensor]):
        self.targets = targets

    def __call__(self, samples: list[Sample]) -> dict[str, Tensor]:
        return {"pixels": torch.stack([s.pixels for s in samples]),
                "tags": torch.stack([self.targets[s.image_key] for s in samples])}


class TagObjectives(nn.Module):
    """BLIP's ViT with a linear tag head on its `[CLS]` output; forward returns {"tags": BCE}."""

    def __init__(self, model: Blip, num_tags: int):
        super().__init__()
        self.model = model
        # PyTorch's default (uniform, +-1/sqrt(width)) start: with normal(0, 0.02) the ViT leaves its start-up
        # plateau hundreds of steps later (measured on the generated scenes)
        self.tag_head = nn.Linear(model.config.vision_config.hidden_size, num_tags)

    def logits(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, tags) tag logits."""
        return self.tag_head(self.model.vision_model(pixels)[:, 0])

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"tags": F.binary_cross_entropy_with_logits(self.logits(batch["pixels"]), batch["tags"])}


def tags_recipe(model: Blip, items: list[Item], min_count: int = 20, max_share: float = 0.5,
                labels: dict[str, set[str]] | None = None) -> Recipe:
    """The tags stage on the loop: trains `model.vision_model`; saves the whole model, the tag head and the tags."""
    from .. import save

    per_item = item_tags(items, labels)  # caption tags normalise every caption: once, for both uses
    tags = build_tags(items, min_count, max_share, labels, per_item)
    objectives = TagObjectives(model, len(tags))

    def write(directory: Path) -> None:
        save(model, directory)
        write_safetensors(objectives.tag_head.state_dict(), Path(directory) / TAG_HEAD_FILE)
        (Path(directory) / TAGS_FILE).write_text(json.dumps(tags, indent=0) + "\n")

    return Recipe(objectives, TagCollate(tag_targets(items, tags, labels, per_item)), model.processor, write,
                  find_unused_parameters=True)
