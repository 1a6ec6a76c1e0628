"""Evaluation: retrieval (ITC, then ITM re-ranking of the top k), captioning BLEU-4 / CIDEr-D, VQA accuracy,
caption colour-and-shape word accuracy and grounding pointing accuracy on the scenes data.

The metrics are small, self-contained implementations of the published formulas:
- BLEU-4 (Papineni et al. 2002): corpus-level modified n-gram precisions for n = 1..4, geometric mean, brevity
  penalty with the closest reference length, as the COCO caption toolkit computes it;
- CIDEr-D (Vedantam et al. 2015): tf-idf weighted n-gram vectors (n = 1..4, document frequencies from the
  evaluated references), clipped cosine similarity, Gaussian length penalty (sigma 6), averaged, times 10;
- retrieval as in BLIP: TR@K counts an image as found when any of its captions ranks in the top K, IR@K a caption
  when its image does; the ITC top k are re-scored with the ITM "match" logit plus the ITC similarity. Because one
  caption string may belong to several images, `TR@1_any` / `IR@1_any` also count a top-1 result whose image has
  that exact caption;
- VQA accuracy: exact match after the VQA normalisation (lower case, punctuation, articles, number words).

BLIP and BLIP-2 go through the same protocols and the models' public methods. Which tasks a model gets depends on
its parts (`NEEDS`): BLIP-2 retrieval checkpoints (Blip2ForImageTextRetrieval) get retrieval and grounding, BLIP-2
generation checkpoints (Blip2ForConditionalGeneration) captioning and VQA; the rest is reported as skipped.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..base import BlipBase
from ..data.scenes import COLOURS as SCENE_COLOURS
from ..data.scenes import SHAPES
from ..errors import InputError
from ..tasks.common import itc_scores
from .data import Item, load_items
from .tags import read_boxes

# ----------------------------------------------------------------------------------------------- captions


def words(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation (what the caption metrics compare)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n of candidate i against references[i] (closest-reference-length brevity penalty)."""
    if len(candidates) != len(references):
        raise InputError(f"{len(candidates)} candidates but {len(references)} reference lists")
    matched, total = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        c = words(cand)
        rs = [words(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for k in range(1, n + 1):
            counts = _ngrams(c, k)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, k)  # max count of each n-gram over the references
            matched[k - 1] += sum(min(v, best[g]) for g, v in counts.items())
            total[k - 1] += max(len(c) - k + 1, 0)
    if min(matched) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / n
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, 1))
    return bp * math.exp(log_p)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D of the candidates (document frequencies from these references), as the COCO caption toolkit."""
    if len(candidates) != len(references):
        raise InputError(f"{len(candidates)} candidates but {len(references)} reference lists")

    def counts(text: str) -> Counter:
        t = words(text)
        return sum((_ngrams(t, k) for k in range(1, 5)), Counter())

    refs = [[counts(r) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update(set().union(*(r.keys() for r in rs)))
    log_n = math.log(float(len(references)))

    def vec(c: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        for g, tf in c.items():
            k = len(g) - 1
            v[k][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
        length = sum(tf for g, tf in c.items() if len(g) == 2)  # the toolkit measures length in bigrams
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, rs in zip(candidates, refs, strict=True):
        vc, nc, lc = vec(counts(cand))
        total = [0.0] * 4
        for r in rs:
            vr, nr, lr = vec(r)
            for k in range(4):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    val /= nc[k] * nr[k]
                total[k] += val * math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
        scores.append(sum(total) / 4 / len(rs) * 10.0)
    return sum(scores) / len(scores)


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


# ----------------------------------------------------------------------------------------------- VQA

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(answer: str) -> str:
    """VQA answer normalisation: lower case, no punctuation, number words as digits, no articles."""
    toks = re.findall(r"[a-z0-9]+", answer.lower().replace("'s", " s"))
    return " ".join(_NUMBERS.get(t, t) for t in toks if t not in _ARTICLES)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Percentage of predictions equal to one of the accepted answers after normalisation."""
    if not predictions:
        return 0.0
    hits = sum(normalize_answer(p) in {normalize_answer(a) for a in acc}
               for p, acc in zip(predictions, answers, strict=True))
    return 100.0 * hits / len(predictions)


# ----------------------------------------------------------------------------------------------- retrieval


def recall_at(scores_i2t: Tensor, text_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """TR@K and IR@K (percent) from an (images, texts) score matrix; `text_image[j]` is the image of text j."""
    n_img, n_txt = scores_i2t.shape
    owner = torch.as_tensor(list(text_image), device=scores_i2t.device)
    # image -> texts: rank of the best-ranked of its captions
    order = scores_i2t.argsort(dim=1, descending=True)  # (Ni, Nt)
    hit = owner[order] == torch.arange(n_img, device=owner.device)[:, None]
    tr_rank = hit.float().argmax(dim=1)
    # text -> images: rank of its image
    order_t = scores_i2t.t().argsort(dim=1, descending=True)  # (Nt, Ni)
    ir_rank = (order_t == owner[:, None]).float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"TR@{k}"] = 100.0 * float((tr_rank < k).float().mean())
    for k in ks:
        out[f"IR@{k}"] = 100.0 * float((ir_rank < k).float().mean())
    return out


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


def pointing_accuracy(
    model: BlipBase, images: list[Path], boxes: list[list[dict]], layer: int | None = None
) -> tuple[float, int]:
    """Share (percent) of uniquely named objects ("the red circle") whose GradCAM peak falls inside their box.

    Uses `blipkit.tasks.ground` (at cross-attention `layer`; None: the model's default); returns (accuracy, number
    of phrases).
    """
    from ..tasks import ground

    hits = n = 0
    for image, objs in tqdm(list(zip(images, boxes, strict=True)), desc="eval/grounding", leave=False):
        names = Counter((o["colour"], o["shape"]) for o in objs)
        for o in objs:
            if names[(o["colour"], o["shape"])] != 1:
                continue
            x, y = ground(model, image, f"the {o['colour']} {o['shape']}", layer=layer).peak
            x1, y1, x2, y2 = o["box_norm"]
            hits += x1 <= x <= x2 and y1 <= y <= y2
            n += 1
    return 100.0 * hits / max(n, 1), n


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
