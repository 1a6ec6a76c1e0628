"""match() with autograd (as before: results kept their graph) vs under inference_mode (now), printing ratios.

    python benchmarks/bench_inference_mode.py             # scenes-blip and scenes-blip2-itm, 1 image x 100 texts
    python benchmarks/bench_inference_mode.py --texts 300

"Before" is the same computation, `forward_itm` under `torch.enable_grad()`, which is what `match` ran until it
was decorated. Memory is the resident size each kept result holds on to (five results kept, divided by five).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare  # noqa: E402

import blipkit  # noqa: E402


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def kept_mb(fn, n: int = 5) -> float:
    """MB of resident memory each of `n` kept results holds."""
    gc.collect()
    before = rss_mb()
    kept = [fn() for _ in range(n)]
    grown = rss_mb() - before
    del kept
    gc.collect()
    return grown / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(2)
    image = Image.new("RGB", (128, 128), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([30, 30, 90, 90], fill=(220, 20, 20))
    texts = [f"a red square number {i} on the left" for i in range(args.texts)]
    for name in ("scenes-blip", "scenes-blip2-itm"):
        model = blipkit.load(name)

        def before(model=model):
            with torch.enable_grad():
                return model.forward_itm(image, texts).float().softmax(dim=-1)[..., 1]

        def after(model=model):
            return model.match(image, texts)

        assert torch.allclose(before().detach(), after(), atol=1e-6)
        t_before, t_after = compare(before, after, repeat=5)
        m_after = kept_mb(after)  # measured first: the graphs kept by `before` are freed afterwards
        m_before = kept_mb(before)
        print(f"{name:<18} match(1 image, {len(texts)} texts)  time: grad {t_before * 1e3:7.1f} ms  inference_mode "
              f"{t_after * 1e3:7.1f} ms  ratio {t_before / t_after:5.2f}x   kept per result: grad {m_before:7.1f} MB  "
              f"inference_mode {m_after:5.1f} MB")


if __name__ == "__main__":
    main()
