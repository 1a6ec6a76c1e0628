"""The ceiling of text -> image R@1 on a generated scenes split: what an oracle that knows the generator reaches.

    python scripts/retrieval_ceiling.py data/scenes [--split test] [--draws 300] [--model scenes-blip --k 16]

Generated captions repeat across images, and a caption true of an image is listed for it only when the generator
happened to draw it among that image's five. The standard protocol counts a hit only for the image a caption was
listed for; "any image" (`IR@1_any` in `blipkit eval`) counts every image that lists the same string. Neither can be
reached by any model: the oracle here sees each scene's objects, simulates the generator's caption draw `--draws`
times per image, and retrieves for each caption the image most likely to list it. Its R@1 under both counts is the
data's ceiling (an estimate from the draws). Also printed: the share of captions true of one image only (by the
simulated draws) and what retrieving uniformly among the images a caption is true of scores.

With `--model`, the model's text -> image R@1 under the same protocol as `blipkit eval` (ITC, then the top `--k`
re-ranked with ITM) is counted three ways: the listed image, any image listing the caption, and any image the caption
is true of (listed, or drawn for it in the simulation: a lower bound, since rare wordings may never be drawn).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from blipkit.data.scenes import draw_captions


def model_top1(name: str, root: Path, images: list[str], texts: list[str], k: int) -> list[str]:
    """The image each text retrieves first: ITC over all images, the top `k` re-ranked with ITM (`blipkit eval`'s
    protocol)."""
    import torch

    import blipkit
    from blipkit.tasks.ranking import itm_scorer
    from blipkit.train.eval import itc_matrix, reranked

    model = blipkit.load(name)
    with torch.inference_mode():
        feats = torch.cat([model.image_features([str(root / i) for i in images[s:s + 64]])
                           for s in tqdm(range(0, len(images), 64), desc="images", unit="batch")])
        _, t2i = reranked(itc_matrix(model, feats, texts), itm_scorer(model, feats, texts), k)
    return [images[i] for i in t2i.argmax(dim=0).tolist()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="a scenes dataset directory (write_dataset)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--draws", type=int, default=300, help="simulated caption draws per image")
    ap.add_argument("--model", action="append", default=[],
                    help="also count this model's R@1 (a shipped name or a directory; repeat for several)")
    ap.add_argument("--k", type=int, default=16, help="with --model: images re-ranked with ITM per text")
    args = ap.parse_args()
    boxes = json.loads((args.data / "annotations" / f"{args.split}_boxes.json").read_text())
    listed = json.loads((args.data / "annotations" / f"{args.split}.json").read_text())
    own = {e["image"]: set(e["caption"]) for e in listed}
    texts = [(e["image"], c) for e in listed for c in e["caption"]]
    odds: dict[str, Counter] = defaultdict(Counter)  # caption -> image -> times drawn
    for entry in tqdm(boxes, desc="simulated draws", unit="img"):
        for d in range(args.draws):
            for caption in draw_captions(entry, random.Random(d)):
                odds[caption][entry["image"]] += 1
    holders = defaultdict(set)  # caption -> images listing it
    for image, caption in texts:
        holders[caption].add(image)
    exact = anyone = uniform = single = 0
    for image, caption in texts:
        drawn = odds[caption]
        best = max(drawn, key=drawn.get) if drawn else None
        exact += best == image
        anyone += best in holders[caption]
        true_of = set(drawn) | holders[caption]
        uniform += len(holders[caption]) / len(true_of)
        single += len(true_of) == 1
    n = len(texts)
    true_of = {c: set(drawn) | holders[c] for c, drawn in odds.items()} if args.model else {}
    for name in args.model:
        best = model_top1(name, args.data, [e["image"] for e in listed], [c for _, c in texts], args.k)
        listed_hits = sum(b == image for b, (image, _) in zip(best, texts, strict=True))
        any_hits = sum(b in holders[c] for b, (_, c) in zip(best, texts, strict=True))
        true_hits = sum(b in true_of.get(c, holders[c]) for b, (_, c) in zip(best, texts, strict=True))
        print(f"  {name} text -> image R@1: {100 * listed_hits / n:.1f} % (listed image), "
              f"{100 * any_hits / n:.1f} % (any image listing it), {100 * true_hits / n:.1f} % (any image it is "
              "true of)")
    print(f"{args.split}: {len(own)} images, {n} captions, {args.draws} simulated draws per image")
    print(f"  oracle text -> image R@1: {100 * exact / n:.1f} % (listed image), {100 * anyone / n:.1f} % (any image "
          f"listing the caption)")
    print(f"  retrieving uniformly among the images a caption is true of: {100 * uniform / n:.1f} % (any image)")
    print(f"  captions true of one image only: {100 * single / n:.1f} %")


if __name__ == "__main__":
    main()
