"""Copy a trained model into the package as a shipped model, its weights stored in float16.

    python scripts/ship.py out/scenes-blip scenes-blip

Writes src/blipkit/models/NAME (config, float16 safetensors, tokenizer, preprocessing); `blipkit.load(NAME)` reads
it back as float32. Keeps an existing eval_results.json.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import blipkit

MODELS = Path(__file__).resolve().parents[1] / "src" / "blipkit" / "models"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="trained model directory (e.g. the --out of blipkit train)")
    p.add_argument("name", help="name to ship it under")
    args = p.parse_args()
    model = blipkit.load(args.source, dtype="float32").half()  # every tensor, the Q-Former too
    target = MODELS / args.name
    results = (target / "eval_results.json").read_bytes() if (target / "eval_results.json").is_file() else None
    shutil.rmtree(target, ignore_errors=True)
    blipkit.save(model, target)
    if results is not None:
        (target / "eval_results.json").write_bytes(results)
    size = sum(f.stat().st_size for f in target.iterdir())
    print(f"{target}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
