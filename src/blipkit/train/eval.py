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
its parts (`NEEDS`): BLIP-2 retrieval checkpoints (Blip2ForImageTextRetrieval) get retrieval and grounding, BLIP-2
generation checkpoints (Blip2ForConditionalGeneration) captioning and VQA; the rest is reported as skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..base import BlipBase
from ..data.readers import Item, load_items
from ..tasks.common import itc_scores
from .metrics import bleu, cider_d, recall_at, vqa_accuracy
from .scene_metrics import colour_shape_accuracy, pointing_accuracy
from .tags import read_boxes


@torch.no_grad()
def itc_matrix(model: BlipBase, feats: Tensor, texts: list[str], batch_size: int = 256) -> Tensor:
    """ITC similarities (Ni, Nt) from image features (Ni, 1 + P, W); BLIP-2 takes each image's best query."""
    img = torch.cat([model.encode_images(feats[s : s + batch_size]).float() for s in range(0, len(feats), batch_size)])
    txt = torch.cat([model.encode_texts(texts[s : s + batch_size]).float() for s in range(0, len(texts), batch_size)])
    return itc_scores(img, txt).cpu()  # (Ni, Nt)


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


def rerank(
    sim: Tensor, score_pairs: Callable[[Tensor, Tensor], Tensor], texts: list[str], text_image: list[int], k: int = 16
) -> dict[str, float]:
    """BLIP's retrieval protocol on an ITC similarity matrix (Ni, Nt).

    The top k texts of each image and the top k images of each text are re-scored with
    `score_pairs(image_rows, text_rows)` (the ITM "match" logit) plus their ITC similarity; everything else scores
    -100. Each distinct pair is scored once. `text_image[j]` is the image of text j.
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


# The parts each task needs, by model family, and what "skipped" says when one is missing.
_ITC_ITM = "the model has no ITC/ITM heads"
_LM = "the model has no language model (Blip2ForConditionalGeneration checkpoints have one)"
NEEDS: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "BLIP": {
        "retrieval": (("vision_proj", "text_proj", "itm_head"), _ITC_ITM),
        "caption": (("text_decoder",), "the model has no captioning decoder"),
        "vqa": (("text_encoder", "text_decoder"), "the model has no VQA heads"),
        "grounding": (("itm_head",), "the model has no ITM head"),
    },
    "BLIP-2": {
        "retrieval": (("vision_projection", "text_projection", "embeddings", "itm_head"),
                      _ITC_ITM + " (Blip2ForImageTextRetrieval checkpoints have them)"),
        "caption": (("language_model",), _LM),
        "vqa": (("language_model",), _LM),
        "grounding": (("itm_head",), "the model has no ITM head (Blip2ForImageTextRetrieval checkpoints have one)"),
    },
}


def _unable(model: BlipBase, task: str) -> str | None:
    """Why `model` cannot do `task`, or None when it can."""
    parts, why = NEEDS[model.family][task]
    if not all(model.has(p) for p in parts):
        return why
    if model.family == "BLIP" and task == "caption" and model.has("text_encoder") and not model.has("vision_proj"):
        return why  # a VQA checkpoint: its decoder reads the question encoder's states, not the image
    return None


@torch.no_grad()
def _features(model: BlipBase, items: list[Item], batch_size: int) -> tuple[Tensor, Tensor]:
    """Preprocessed pixels (N, 3, H, W) and image features (N, 1 + P, W) of every item."""
    pix, feats = [], []
    for s in tqdm(range(0, len(items), batch_size), desc="eval/images", leave=False):
        p = model.pixels([it.image for it in items[s : s + batch_size]])
        pix.append(p)
        feats.append(model.image_features(p))
    return torch.cat(pix), torch.cat(feats)


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
) -> dict:
    """Metrics of a BLIP or BLIP-2 `model` on a split; returns {"metrics": {...}, "counts": {...}, "captions": [...],
    "answers": [...]}. `layer`: the cross-attention layer grounding reads (None: the model's default).

    Tasks the model or the data cannot do are reported under "skipped" with the reason.
    """
    loaded = load_items(data, split, image_root, vqa, skip_bad)
    items = loaded.items[:limit] if limit else loaded.items
    model.eval()
    pixels, feats = _features(model, items, batch_size)
    # BLIP-2 captions and answers from the features computed once; BLIP's caption() and answer() take pixels
    images = feats if model.family == "BLIP-2" else pixels
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {"images": len(items), "skipped_entries": loaded.skipped}
    skipped: dict[str, str] = {}
    report: dict = {"model": model.name_or_path, "data": str(data), "split": split}
    scene_boxes = _boxes_for(data, split, boxes)
    objects = [scene_boxes.get(it.key) for it in items] if scene_boxes else None

    if "retrieval" in tasks:
        if why := _unable(model, "retrieval"):
            skipped["retrieval"] = why
        else:
            texts = [c for it in items for c in it.captions]
            owner = [i for i, it in enumerate(items) for _ in it.captions]
            metrics.update(retrieval(model, feats, texts, owner, k))
            counts["retrieval_texts"] = len(texts)
    if "caption" in tasks:
        if why := _unable(model, "caption"):
            skipped["caption"] = why
        else:
            caps = []
            for s in tqdm(range(0, len(items), batch_size), desc="eval/captions", leave=False):
                caps += model.caption(images[s : s + batch_size], num_beams=num_beams, min_new_tokens=1)
            refs = [it.captions for it in items]
            metrics["BLEU-4"] = 100.0 * bleu(caps, refs)
            metrics["CIDEr"] = 100.0 * cider_d(caps, refs)
            if objects is not None and all(o is not None for o in objects):
                acc = colour_shape_accuracy(caps, objects)
                metrics["caption_colour_shape_acc"] = acc["colour_shape_acc"]
                metrics["caption_coverage"] = acc["coverage"]
                metrics["caption_all_true"] = acc["all_true"]
            report["captions"] = [{"image": it.key, "caption": c} for it, c in zip(items, caps, strict=True)]
    if "vqa" in tasks:
        qa = [(i, q, a) for i, it in enumerate(items) for q, a in it.qa]
        if not qa:
            skipped["vqa"] = "the data has no question-answer pairs"
        elif why := _unable(model, "vqa"):
            skipped["vqa"] = why
        else:
            preds = []
            for s in tqdm(range(0, len(qa), batch_size), desc="eval/vqa", leave=False):
                chunk = qa[s : s + batch_size]
                rows = torch.tensor([i for i, _, _ in chunk], device=images.device)
                preds += model.answer(images[rows], [q for _, q, _ in chunk], num_beams=1)
            metrics["VQA_acc"] = vqa_accuracy(preds, [a for _, _, a in qa])
            counts["questions"] = len(qa)
            report["answers"] = [{"image": items[i].key, "question": q, "answer": p, "truth": a}
                                 for (i, q, a), p in zip(qa, preds, strict=True)]
    if "grounding" in tasks:
        if objects is None or any(o is None for o in objects):
            skipped["grounding"] = "no boxes for this data (pass --boxes, or use a scenes dataset)"
        elif why := _unable(model, "grounding"):
            skipped["grounding"] = why
        else:
            acc, n = pointing_accuracy(model, [it.image for it in items], objects, layer)
            metrics["pointing_acc"] = acc
            counts["grounding_phrases"] = n
    report.update(metrics={k_: round(v, 2) for k_, v in metrics.items()}, counts=counts, skipped=skipped)
    return report


def format_metrics(report: dict) -> str:
    """A short human-readable table of a report."""
    lines = [f"{report['model']} on {report['data']} [{report['split']}]: "
             + ", ".join(f"{v} {k}" for k, v in report["counts"].items())]
    lines += [f"  {k:<26} {v:7.2f}" for k, v in report["metrics"].items()]
    lines += [f"  {k:<26} skipped: {why}" for k, why in report["skipped"].items()]
    return "\n".join(lines)
