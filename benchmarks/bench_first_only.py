"""The ITM / ITC heads read one position: the text stack's last layer computed for it alone vs for every position.

    python benchmarks/bench_first_only.py [--rounds 6] [--calls 20] [--threads 1]

Times `blipkit.serve.jobs.match` (what `blipkit serve` runs for /api/match: one image and three texts per request,
ITC and ITM) on the shipped scenes-blip at batches of 8 and 1 requests, with `first_only` as the model uses it and
with it forced off (every position of the last layer computed, as before), in interleaved rounds; prints the median
milliseconds per call and the ratio, and the largest difference of the scores between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

import blipkit
from blipkit import text as text_module
from blipkit.serve import jobs

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["a red circle left of a blue square", "a green triangle", "a yellow star"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=20, help="calls timed per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the serve model process uses one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = blipkit.load("scenes-blip")
    image = Image.open(ROOT / "examples" / "red-circle-blue-square.png").convert("RGB")
    pixels = model.pixels(image)
    full_forward = text_module.TextEncoder.forward

    def every_position(self, *a, first_only=False, **kw):
        return full_forward(self, *a, first_only=False, **kw)

    modes = {"first position alone": full_forward, "every position": every_position}
    print(f"torch {torch.__version__}, threads {args.threads}, scenes-blip, jobs.match (1 image + 3 texts a request)")
    for n in (8, 1):
        batch = [jobs.Job([image], TEXTS, {}, pixels=pixels.clone()) for _ in range(n)]
        times: dict[str, list[float]] = {m: [] for m in modes}
        results = {}
        for r in range(args.rounds):
            for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                text_module.TextEncoder.forward = modes[mode]
                results[mode] = jobs.match(model, batch)
                t = time.perf_counter()
                for _ in range(args.calls):
                    jobs.match(model, batch)
                times[mode].append((time.perf_counter() - t) / args.calls * 1e3)
        text_module.TextEncoder.forward = full_forward
        a, b = (statistics.median(times[m]) for m in modes)
        diff = max(abs(x[k] - y[k]) for ra, rb in zip(*results.values(), strict=True) for ia, ib in zip(ra, rb,
                   strict=True) for x, y in zip(ia, ib, strict=True) for k in ("itc", "itm"))
        print(f"batch {n}: first position alone {a:.2f} ms, every position {b:.2f} ms per call: {b / a:.3f}x "
              f"(largest score difference {diff:.1e})", flush=True)


if __name__ == "__main__":
    main()
