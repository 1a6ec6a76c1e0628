"""What each endpoint computes, for a batch of requests at once: the same model methods and tasks the CLI calls.

Every function takes the model and a list of `Job`s that the batcher gathered (all with equal options, since the
options are part of the batching key) and returns one result per job. Images of all the jobs go through the model
in one call and are split back; the result of each job equals what the call on its images alone gives.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..base import BlipBase, ImageFeatures
from ..errors import CapabilityError
from ..tasks import classify as classify_task
from ..tasks import cross_attention_maps
from ..tasks import ground as ground_task
from ..tasks.common import has_itc, has_itm, itc_scores


@dataclass
class Job:
    """One request's work: its images, its texts, and its options (equal across a batch).

    `pixels`, when set, are the images preprocessed (`model.pixels`) where the request came in, off the model's thread.
    """

    images: list[Image.Image]
    texts: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    pixels: torch.Tensor | None = None


def _inputs(jobs: list[Job]) -> Any:
    """The images of all the jobs, in order, for one model call: their pixels when every job has them."""
    if all(job.pixels is not None for job in jobs):
        return torch.cat([job.pixels for job in jobs])
    return [im for job in jobs for im in job.images]


def _features(model: BlipBase, jobs: list[Job]) -> ImageFeatures:
    """Image features of all the jobs, in order: one ViT pass.

    Pixels made at the edge are `model.pixels` of decoded images, so they go to the vision tower as they are: the
    checks `image_features` makes on a tensor from outside (finite, normalised) would cost a pass over every pixel.
    """
    if all(job.pixels is not None for job in jobs):
        pixels = torch.cat([job.pixels for job in jobs]).to(model.device, model.dtype)
        return model.vision_model(pixels).as_subclass(ImageFeatures)
    return model.image_features(_inputs(jobs))


def _split(values: list[Any], jobs: list[Job]) -> list[list[Any]]:
    """Per-image values of all the jobs, in order -> one list per job."""
    out, start = [], 0
    for job in jobs:
        out.append(values[start : start + len(job.images)])
        start += len(job.images)
    return out


def _itc(model: BlipBase, feats: torch.Tensor, jobs: list[Job]) -> tuple[torch.Tensor, dict[str, int]]:
    """ITC similarity of every image (rows) with every distinct text of the jobs (columns), and the column of each."""
    texts = list(dict.fromkeys(t for job in jobs for t in job.texts))
    scores = itc_scores(model.encode_images(feats).float(), model.encode_texts(texts).float())
    return scores.cpu(), {t: j for j, t in enumerate(texts)}


def match(model: BlipBase, jobs: list[Job]) -> list[list[list[dict[str, Any]]]]:
    """Per job, per image, one {text, itc, itm} per text (a head the model lacks gives None)."""
    itc, itm = has_itc(model), has_itm(model)
    if not (itc or itm):
        model.require("itm", "match images and texts")
    with torch.inference_mode():
        feats = _features(model, jobs)  # one ViT pass for the batch
        sims, column = _itc(model, feats, jobs) if itc else (None, {})
        # one ITM pass for the batch: each image with its own request's texts
        probs = model.match_pairs(feats, [job.texts for job in jobs for _ in job.images]) if itm else None
    sims = sims.tolist() if sims is not None else None  # one conversion, not one per score
    out, row = [], 0
    for job in jobs:
        per_image = []
        for i in range(row, row + len(job.images)):
            itm_i = probs[i].float().tolist() if probs is not None else [None] * len(job.texts)
            per_image.append([{"text": t, "itc": sims[i][column[t]] if sims is not None else None,
                               "itm": p} for t, p in zip(job.texts, itm_i, strict=True)])
        out.append(per_image)
        row += len(job.images)
    return out


def similarity(model: BlipBase, jobs: list[Job]) -> list[list[list[float]]]:
    """Per job, the ITC cosine similarity (images x texts)."""
    with torch.inference_mode():
        feats = _features(model, jobs)
        sims, column = _itc(model, feats, jobs)
    sims, rows, start = sims.tolist(), [], 0
    for job in jobs:  # each image's row over its own job's texts
        rows += [[sims[start + i][column[t]] for t in job.texts] for i in range(len(job.images))]
        start += len(job.images)
    return _split(rows, jobs)


def caption(model: BlipBase, jobs: list[Job]) -> list[list[Any]]:
    """Per job, the caption(s) of each image, with the options of the batch (a seed is set for sampling)."""
    options = dict(jobs[0].options)
    seed = options.pop("seed", None)
    if options.get("do_sample") and seed is not None:
        torch.manual_seed(seed)  # sampling jobs run alone on the one model thread: the seed decides the result
    captions = model.caption(_inputs(jobs), **options)
    return _split(list(captions), jobs)


def ask(model: BlipBase, jobs: list[Job]) -> list[list[str]]:
    """Per job, the answer to its question about each of its images (generated, or ranked from `answers`)."""
    options = dict(jobs[0].options)
    if options.get("answers") is not None and "answers" not in inspect.signature(model.answer).parameters:
        raise CapabilityError(f"{model.name_or_path} generates answers and cannot rank given ones: leave out answers")
    options = {k: v for k, v in options.items() if v is not None}
    questions = [job.texts[0] for job in jobs for _ in job.images]
    return _split(model.answer(_inputs(jobs), questions, **options), jobs)


def classify(model: BlipBase, jobs: list[Job]) -> list[list[list[tuple[str, float]]]]:
    """Per job, the top labels of each image (labels, templates, head and k are the batch's)."""
    o = jobs[0].options
    top = classify_task(model, [im for job in jobs for im in job.images], o["labels"], o["templates"],
                        head=o["head"], k=o["k"], progress=False)
    return _split(top, jobs)


def ground(model: BlipBase, jobs: list[Job]) -> list[list[Any]]:
    """Per job, one `Grounding` per phrase in its one image (GradCAM needs a backward pass each: not batched)."""
    o = jobs[0].options
    return [[ground_task(model, job.images[0], p, layer=o["layer"], threshold=o["threshold"], source=o["source"])
             for p in job.texts] for job in jobs]


def attention(model: BlipBase, jobs: list[Job]) -> list[Any]:
    """Per job, the cross-attention maps of its one image and text."""
    o = jobs[0].options
    return [cross_attention_maps(model, job.images[0], job.texts[0] if job.texts else None, layer=o["layer"],
                                 suppress_common=o["suppress_common"]) for job in jobs]
