"""Evaluation: retrieval (ITC, then ITM re-ranking of the top k), captioning BLEU-4 / CIDEr-D, VQA accuracy,
caption colour-and-shape word accuracy and grounding pointing accuracy on the scenes data.

The metrics live in `metrics` (general) and `scene_metrics` (what knows the scenes data); this module runs the
protocols:
- retrieval as in BLIP: TR@K counts an image as found when any of its captions ranks in the top K, IR@K a caption
  when its image does; the ITC top k are re-scored with the ITM "match" logit plus the ITC similarity. Because one
  caption string may belong to several images, `TR@1_any` / `IR@1_any` also count a top-1 result whose image has
  that exact caption;
- VQA accuracy after the VQA answer normalisation.

BLIP and BLIP-2 go through the same protocols and the models' public methods. Which tasks a model gets depends on
its capabilities (`NEEDS`, asked of the model's capability table): BLIP-2 retrieval checkpoints
(Blip2ForImageTextRetrieval) get retrieval and grounding, BLIP-2 generation checkpoints
(Blip2ForConditionalGeneration) captioning and VQA; the rest is reported as skipped with the table's reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..base import BlipBase
from ..data.readers import Item, Loaded, load_items
from ..errors import InputError
from ..tasks.attention import resolve_source
from ..tasks.common import itc_scores
from ..tasks.ranking import itm_scorer
from .metrics import bleu, cider_d, recall_at, vqa_accuracy
from .scene_metrics import colour_shape_accuracy, pointing_accuracy
from .tags import read_boxes


@torch.no_grad()
def itc_matrix(model: BlipBase, feats: Tensor, texts: list[str], batch_size: int = 256) -> Tensor:
    """ITC similarities (Ni, Nt) from image features (Ni, 1 + P, W); BLIP-2 takes each image's best query."""
    img = torch.cat([model.encode_images(feats[s : s + batch_size]).float() for s in range(0, len(feats), batch_size)])
    txt = torch.cat([model.encode_texts(texts[s : s + batch_size]).float() for s in range(0, len(texts), batch_size)])
    return itc_scores(img, txt).cpu()  # (Ni, Nt)


def reranked(sim: Tensor, score_pairs: Callable[[Tensor, Tensor], Tensor], k: int = 16) -> tuple[Tensor, Tensor]:
    """(i2t, t2i) score matrices (Ni, Nt) of BLIP's retrieval protocol on an ITC similarity matrix (Ni, Nt).

    The top k texts of each image (i2t) and the top k images of each text (t2i) are re-scored with
    `score_pairs(image_rows, text_rows)` (the ITM "match" logit) plus their ITC similarity; everything else scores
    -100. Each distinct pair is scored once.
    """
    n_img, n_txt = sim.shape
    k_t, k_i = min(k, n_txt), min(k, n_img)
    top_t = sim.topk(k_t, dim=1).indices  # (Ni, k_t)
    top_i = sim.t().topk(k_i, dim=1).indices  # (Nt, k_i)
    img = torch.cat([torch.arange(n_img).repeat_interleave(k_t), top_i.flatten()])  # i2t pairs, then t2i pairs
    txt = torch.cat([top_t.flatten(), torch.arange(n_txt).repeat_interleave(k_i)])
    keys, where = (img * n_txt + txt).unique(return_inverse=True)
    scores = score_pairs(keys // n_txt, keys % n_txt)[where] + sim[img, txt]
    n = n_img * k_t
    i2t, t2i = torch.full_like(sim, -100.0), torch.full_like(sim, -100.0)  # both (Ni, Nt)
    i2t[img[:n], txt[:n]] = scores[:n]
    t2i[img[n:], txt[n:]] = scores[n:]
    return i2t, t2i


def rerank(
    sim: Tensor, score_pairs: Callable[[Tensor, Tensor], Tensor], texts: list[str], text_image: list[int], k: int = 16
) -> dict[str, float]:
    """BLIP's retrieval metrics on an ITC similarity matrix (Ni, Nt), re-ranked as `reranked` does.
    `text_image[j]` is the image of text j."""
    n_img = sim.shape[0]
    i2t, t2i = reranked(sim, score_pairs, k)
    tr = {key: v for key, v in recall_at(i2t, text_image).items() if key.startswith("TR")}
    ir = {key: v for key, v in recall_at(t2i, text_image).items() if key.startswith("IR")}
    itc = recall_at(sim, text_image)
    out = {**tr, **ir, "TR@1_itc": itc["TR@1"], "IR@1_itc": itc["IR@1"]}
    out["R_mean"] = sum(out[f"{d}@{m}"] for d in ("TR", "IR") for m in (1, 5, 10)) / 6
    # the same caption can belong to several images; counting any image that has the retrieved string as a hit
    own: list[set[str]] = [set() for _ in range(n_img)]
    for j, i in enumerate(text_image):
        own[i].add(texts[j])
    best_text, best_image = i2t.argmax(dim=1).tolist(), t2i.argmax(dim=0).tolist()
    out["TR@1_any"] = 100.0 * sum(texts[j] in own[i] for i, j in enumerate(best_text)) / len(best_text)
    out["IR@1_any"] = 100.0 * sum(texts[j] in own[i] for j, i in enumerate(best_image)) / len(best_image)
    return out


def retrieval(model: BlipBase, feats: Tensor, texts: list[str], text_image: list[int], k: int = 16) -> dict[str, float]:
    """Retrieval metrics of a BLIP or BLIP-2 model from its image features (Ni, 1 + P, W) (see `rerank`)."""
    return rerank(itc_matrix(model, feats, texts), itm_scorer(model, feats, texts), texts, text_image, k)


# ----------------------------------------------------------------------------------------------- grounding


# ----------------------------------------------------------------------------------------------- driver


def _boxes_for(data: str | Path, split: str, boxes: str | Path | None) -> dict[str, list[dict]] | None:
    if boxes is not None:
        return read_boxes(boxes, "--boxes")
    manifest = Path(data) / "dataset.json"
    if manifest.is_file():
        import json

        info = json.loads(manifest.read_text())["splits"].get(split, {})
        if info.get("boxes") and (Path(data) / info["boxes"]).is_file():
            return read_boxes(Path(data) / info["boxes"], "--boxes")
    return None


# The capabilities each task needs (see `config.CAPABILITIES`); the model's capability table says why one is missing.
NEEDS: dict[str, tuple[str, ...]] = {
    "retrieval": ("itc", "itm"),
    "caption": ("caption",),
    "vqa": ("vqa",),
    "grounding": ("ground",),
}


def _unable(model: BlipBase, task: str) -> str | None:
    """Why `model` cannot do `task` ("cannot <capability>: <reason>"), or None when it can."""
    from ..config import CAPABILITIES

    for capability in NEEDS[task]:
        if why := model.config.unable(capability):
            return f"cannot {CAPABILITIES[capability]}: {why}"
    return None


def _features(model: BlipBase, items: list[Item], batch_size: int, skip_bad: bool) -> tuple[list[Item], Tensor, Tensor]:
    """The items whose images can be read, their preprocessed pixels (N, 3, H, W) and image features (N, 1 + P, W).

    An image that cannot be decoded (truncated, not an image) is an InputError naming the entry, or with `skip_bad`
    is left out (the caller counts what is missing).
    """
    kept, pix, feats = [], [], []
    for s in tqdm(range(0, len(items), batch_size), desc="eval/images", leave=False):
        chunk = []
        for it in items[s : s + batch_size]:
            try:
                chunk.append(model.pixels([it.image]))
            except InputError as e:
                if not skip_bad:
                    raise InputError(f"entry {it.key}: {e} (or pass --skip-bad to skip such entries)") from None
                continue
            kept.append(it)
        if chunk:
            with torch.no_grad():
                pix.append(torch.cat(chunk))
                feats.append(model.image_features(pix[-1]))
    if not kept:
        raise InputError("none of the images could be read")
    return kept, torch.cat(pix), torch.cat(feats)


@dataclass
class _Run:
    """One evaluation: the items with their images and features, and the report being filled in."""

    model: BlipBase
    items: list[Item]
    images: Tensor  # what caption() and answer() take: BLIP-2 image features, BLIP pixels
    feats: Tensor
    objects: list | None  # each item's boxes (scenes data or --boxes), or None
    batch_size: int
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def batches(self, n: int, desc: str):
        """Start offsets of batches over `n` rows, with a progress bar."""
        return tqdm(range(0, n, self.batch_size), desc=desc, leave=False)


def _retrieval(run: _Run, k: int) -> None:
    texts = [c for it in run.items for c in it.captions]
    owner = [i for i, it in enumerate(run.items) for _ in it.captions]
    run.metrics.update(retrieval(run.model, run.feats, texts, owner, k))
    run.counts["retrieval_texts"] = len(texts)


def _captions(run: _Run, num_beams: int) -> None:
    caps: list[str] = []
    for s in run.batches(len(run.items), "eval/captions"):
        caps += run.model.caption(run.images[s : s + run.batch_size], num_beams=num_beams, min_new_tokens=1)
    refs = [it.captions for it in run.items]
    run.metrics["BLEU-4"] = 100.0 * bleu(caps, refs)
    run.metrics["CIDEr"] = 100.0 * cider_d(caps, refs)
    if run.objects is not None and all(o is not None for o in run.objects):
        acc = colour_shape_accuracy(caps, run.objects)
        run.metrics["caption_colour_shape_acc"] = acc["colour_shape_acc"]
        run.metrics["caption_coverage"] = acc["coverage"]
        run.metrics["caption_all_true"] = acc["all_true"]
    run.report["captions"] = [{"image": it.key, "caption": c} for it, c in zip(run.items, caps, strict=True)]


def _vqa(run: _Run, qa: list[tuple[int, str, list[str]]]) -> None:
    preds: list[str] = []
    for s in run.batches(len(qa), "eval/vqa"):
        chunk = qa[s : s + run.batch_size]
        rows = torch.tensor([i for i, _, _ in chunk], device=run.images.device)
        preds += run.model.answer(run.images[rows], [q for _, q, _ in chunk], num_beams=1)
    run.metrics["VQA_acc"] = vqa_accuracy(preds, [a for _, _, a in qa])
    run.counts["questions"] = len(qa)
    run.report["answers"] = [{"image": run.items[i].key, "question": q, "answer": p, "truth": a}
                             for (i, q, a), p in zip(qa, preds, strict=True)]


def _grounding(run: _Run, layer: int | None, source: str | None) -> None:
    acc, n = pointing_accuracy(run.model, [it.image for it in run.items], run.objects, layer, source)
    run.metrics["pointing_acc"] = acc
    run.counts["grounding_phrases"] = n


def _check_layer(model: BlipBase, layer: int | None) -> None:
    """An InputError for a grounding `layer` the model does not have, before any work."""
    if layer is not None:
        from ..tasks.attention import GROUND_STACKS, find_stack, resolve_layer

        part, stack = find_stack(model, GROUND_STACKS, "ground")
        resolve_layer(model, stack, layer, part)


def evaluate(
    model: BlipBase,
    data: str | Path,
    split: str = "test",
    tasks: Sequence[str] = ("retrieval", "caption", "vqa", "grounding"),
    k: int = 16,
    limit: int | None = None,
    image_root: str | Path | None = None,
    vqa: str | Path | None = None,
    boxes: str | Path | None = None,
    batch_size: int = 64,
    num_beams: int = 3,
    skip_bad: bool = False,
    layer: int | None = None,
    loaded: Loaded | None = None,
    source: str | None = None,
) -> dict:
    """Metrics of a BLIP or BLIP-2 `model` on a split; returns {"metrics": {...}, "counts": {...}, "captions": [...],
    "answers": [...]}. `layer`: the cross-attention layer grounding reads and `source` the map its box comes from
    (None: the model's defaults; `blipkit.tasks.ground`); `loaded`: the items already read from `data` (read here
    when None). With `skip_bad`, entries whose image cannot be read are left out and counted in "skipped_entries".

    Tasks the model or the data cannot do are reported under "skipped" with the reason.
    """
    if loaded is None:
        loaded = load_items(data, split, image_root, vqa, skip_bad)
    if not _unable(model, "grounding"):
        _check_layer(model, layer)
        resolve_source(model, source)
    scene_boxes = _boxes_for(data, split, boxes)
    model.eval()
    wanted = loaded.items[:limit] if limit else loaded.items
    items, pixels, feats = _features(model, wanted, batch_size, skip_bad)
    # BLIP-2 captions and answers from the features computed once; BLIP's caption() and answer() take pixels
    run = _Run(model, items, feats if model.family == "BLIP-2" else pixels, feats,
               [scene_boxes.get(it.key) for it in items] if scene_boxes else None, batch_size,
               counts={"images": len(items), "skipped_entries": loaded.skipped + len(wanted) - len(items)},
               report={"model": model.name_or_path, "data": str(data), "split": split})
    qa = [(i, q, a) for i, it in enumerate(items) for q, a in it.qa]
    no_boxes = run.objects is None or any(o is None for o in run.objects)
    data_lacks = {"vqa": "the data has no question-answer pairs" if not qa else None,
                  "grounding": "no boxes for this data (pass --boxes, or use a scenes dataset)" if no_boxes else None}
    steps = {"retrieval": lambda: _retrieval(run, k), "caption": lambda: _captions(run, num_beams),
             "vqa": lambda: _vqa(run, qa), "grounding": lambda: _grounding(run, layer, source)}
    for task, step in steps.items():
        if task in tasks:
            why = data_lacks.get(task) or _unable(model, task)
            if why:
                run.skipped[task] = why
            else:
                step()
    run.report.update(metrics={k_: round(v, 2) for k_, v in run.metrics.items()}, counts=run.counts,
                      skipped=run.skipped)
    return run.report


def format_metrics(report: dict) -> str:
    """A short human-readable table of a report."""
    lines = [f"{report['model']} on {report['data']} [{report['split']}]: "
             + ", ".join(f"{v} {k}" for k, v in report["counts"].items())]
    lines += [f"  {k:<26} {v:7.2f}" for k, v in report["metrics"].items()]
    lines += [f"  {k:<26} skipped: {why}" for k, why in report["skipped"].items()]
    return "\n".join(lines)
