"""Caption, VQA and retrieval metrics: small, self-contained implementations of the published formulas.

- BLEU-4 (Papineni et al. 2002): corpus-level modified n-gram precisions for n = 1..4, geometric mean, brevity
  penalty with the closest reference length, as the COCO caption toolkit computes it;
- CIDEr-D (Vedantam et al. 2015): tf-idf weighted n-gram vectors (n = 1..4, document frequencies from the
  evaluated references), clipped cosine similarity, Gaussian length penalty (sigma 6), averaged, times 10;
- retrieval as in BLIP: TR@K counts an image as found when any of its captions ranks in the top K, IR@K a caption
  when its image does;
- VQA accuracy: exact match after the VQA normalisation (lower case, punctuation, articles, number words).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import InputError

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
