"""Two-stage search of an image table: ITC first (LanceDB: ANN index or exact), then ITM re-ranking of the best.

- Text -> images: the text's ITC embedding against `embedding` (BLIP) or, for BLIP-2, against the `queries`
  multivector column, where LanceDB's MaxSim of one query vector is the best query's cosine: BLIP-2's ITC.
  The best max(rerank, k) are re-scored as in BLIP's retrieval protocol (`tasks.ranking.itm_scorer`): final score =
  ITM "match" logit + ITC similarity. Their patch features come from the `features` column when the table has it,
  else the candidates' images are decoded and encoded again (batched).
- Image -> images: ITC only (ITM scores image-text pairs): cosine of the embeddings (BLIP) or the mean over the
  query image's vectors of their best match among each row's vectors (BLIP-2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..base import BlipBase
from ..errors import InputError
from ..tasks.common import encode_texts
from ..tasks.ranking import itm_scorer
from .decode import Decoded, decode
from .engine import pixels
from .readers import item_of_path

SHOWN = ("key", "path", "width", "height", "text", "caption", "label")  # row fields a hit carries when present
DEFAULT_RERANK = 32
DEFAULT_REFINE = 20  # ANN candidates re-scored exactly with the stored vectors, as a multiple of k (no-op when exact)
# BLIP-2's query vectors: Lance's multivector index finds its candidate rows from k alone (a larger refine_factor
# re-scores the same few rows), so blipkit asks it for more rows, re-scores them by exact MaxSim and keeps the best k.
# Measured (docs/collections.md, 100,000 rows): k 10 with refine 20 found 0.72 of the true top 10; 400 candidates
# 0.94, 800 candidates 1.00 (rows of 32 independent vectors; 0.99 / 1.00 on rows like scenes-blip2-itm's).
MULTIVECTOR_CANDIDATES = 800
RERANK_BATCH = 32


def multivector_candidates(n: int, refine_factor: int | None = None) -> int:
    """Rows a multivector first stage takes from the index for `n` hits: n x refine_factor when given, else
    n x DEFAULT_REFINE and at least MULTIVECTOR_CANDIDATES."""
    if refine_factor is not None:
        return n * max(1, refine_factor)
    return max(n * DEFAULT_REFINE, MULTIVECTOR_CANDIDATES)


def _first_stage(table, column: str, query: np.ndarray, n: int, where: str | None, extra: tuple[str, ...] = (),
                 nprobes: int | None = None, refine_factor: int | None = None):
    """The `n` nearest rows by cosine (ANN when the column is indexed), with the shown columns and `extra`, best
    first. Multivector columns: `multivector_candidates` rows, re-scored by exact MaxSim, the best n kept."""
    names = table.schema.names
    nearest: dict[str, Any] = {"column": column, "q": query, "k": n, "metric": "cosine"}
    if nprobes is not None:
        nearest["nprobes"] = nprobes
    if column == "queries":
        nearest.update(k=multivector_candidates(n, refine_factor), refine_factor=1)  # refine 1: exact MaxSim
    else:
        nearest["refine_factor"] = DEFAULT_REFINE if refine_factor is None else refine_factor
    try:
        rows = table.to_table(columns=[c for c in (*SHOWN, *extra) if c in names] + ["_distance"], nearest=nearest,
                              filter=where, prefilter=True)
    except Exception as e:  # lance reports a bad filter as a generic error
        if where:
            raise InputError(f"--where {where!r} is not a filter this table can run ({str(e).splitlines()[0]}); "
                             f"columns: {', '.join(names)}") from None
        raise
    return rows.take(np.argsort(rows.column("_distance").to_numpy(), kind="stable")[:n])


def _hits(rows, itc: np.ndarray) -> list[dict[str, Any]]:
    shown = [c for c in SHOWN if c in rows.column_names]
    cols = {c: rows.column(c).to_pylist() for c in shown}
    return [{**{c: cols[c][i] for c in shown}, "score": float(itc[i]), "itc": float(itc[i])} for i in range(len(rows))]


def check_k(k: int, rerank: int) -> None:
    """InputError for a k below 1 or a negative rerank."""
    if k < 1:
        raise InputError(f"k={k}: ask for at least one hit")
    if rerank < 0:
        raise InputError(f"rerank={rerank}: use 0 (ITC only) or more")


@torch.no_grad()
def search_text(model: BlipBase, table, settings: dict[str, Any], text: str, k: int = 10,
                rerank: int = DEFAULT_RERANK, where: str | None = None, **ann) -> list[dict[str, Any]]:
    """The `k` images that best match `text`, best first: dicts with path, score, itc (and itm when re-ranked)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"search text {text!r} is empty: give some words")
    check_k(k, rerank)
    if rerank:
        model.require("itm", "re-rank with ITM")
    query = encode_texts(model, [text])[0].cpu().numpy()
    column = "queries" if settings["queries"] else "embedding"
    extra = ("features",) if rerank and settings["features"] else ()
    rows = _first_stage(table, column, query, max(k, rerank), where, extra, **ann)
    itc = 1.0 - rows.column("_distance").to_numpy()  # one query vector: MaxSim distance is 1 - the best cosine
    hits = _hits(rows, itc)
    if not rerank or not hits:
        return hits[:k]
    n = min(len(hits), max(k, rerank))
    feats, missing = _candidate_features(model, settings, rows, hits[:n])
    scored = [i for i in range(n) if i not in missing]
    if scored:
        logits = itm_scorer(model, feats, [text])(torch.arange(len(scored)), torch.zeros(len(scored), dtype=torch.long))
        for i, logit in zip(scored, logits.tolist(), strict=True):
            hits[i].update(itm=logit, score=logit + hits[i]["itc"])
    for i, reason in missing.items():
        hits[i].update(itm=None, score=None, error=reason)
    ranked = sorted((hits[i] for i in scored), key=lambda h: -h["score"]) + [hits[i] for i in missing]
    return ranked[:k]


def _candidate_features(model: BlipBase, settings: dict[str, Any], rows, hits: list[dict[str, Any]]):
    """Patch features (n, 1 + P, W) of the candidates that have them, and {index: reason} of those that do not."""
    if "features" in rows.column_names:
        tokens, width = settings["features"]
        flat = rows.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        feats = torch.from_numpy(flat.reshape(-1, tokens, width)[: len(hits)].astype(np.float32))
        return feats.to(model.device, model.dtype), {}
    missing: dict[int, str] = {}
    decoded: list[Decoded] = []
    for i, hit in enumerate(hits):
        result = decode(item_of_path(hit["path"]), model.processor)
        if isinstance(result, Decoded):
            decoded.append(result)
        else:
            missing[i] = f"cannot re-read the image for re-ranking: {result.reason}"
    feats = [model.image_features(pixels(decoded[s : s + RERANK_BATCH]).to(model.device, model.dtype))
             for s in range(0, len(decoded), RERANK_BATCH)]
    return (torch.cat(feats) if feats else None), missing


@torch.no_grad()
def search_image(model: BlipBase, table, settings: dict[str, Any], image: Any, k: int = 10,
                 where: str | None = None, **ann) -> list[dict[str, Any]]:
    """The `k` images most similar to `image` by ITC, best first."""
    check_k(k, 0)
    emb = model.encode_images(model.pixels(image)).float()[0].cpu().numpy()  # (D,) or (Q, D)
    if emb.ndim == 2:
        rows = _first_stage(table, "queries", emb, k, where, **ann)
        itc = 1.0 - rows.column("_distance").to_numpy() / len(emb)  # MaxSim distance sums Q of (1 - best cosine)
    else:
        rows = _first_stage(table, "embedding", emb, k, where, **ann)
        itc = 1.0 - rows.column("_distance").to_numpy()
    return _hits(rows, itc)
