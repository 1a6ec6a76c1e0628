"""Write a shipped model's `eval_results.json`: the held-out test report and its fresh-split statistics.

    python scripts/card_stats.py MODEL --test out/eval_test.json [--seeds 101-108] [--images 100] [--k 4]

The "test" section copies the metrics of a `blipkit eval --out FILE` report. The "fresh" section evaluates the model
on newly generated test splits (`write_dataset(root, 0, 0, images, seed=s)` for each seed) and records each
metric's mean, sample standard deviation and the tolerance tests/test_shipped.py allows: max(3 std, 5 points;
10 for CIDEr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import blipkit
from blipkit.data.scenes import write_dataset
from blipkit.train.eval import evaluate

HEADLINE = ("TR@1", "IR@1", "IR@1_any", "TR@1_itc", "IR@1_itc", "BLEU-4", "CIDEr", "caption_colour_shape_acc",
            "VQA_acc", "pointing_acc")


def seeds(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="shipped model name or model directory (eval_results.json is written there)")
    p.add_argument("--test", required=True, help="JSON report of `blipkit eval --out` on the held-out test split")
    p.add_argument("--test-command", default="blipkit eval --data data/scenes --split test")
    p.add_argument("--seeds", default="101-108")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--tasks", default="retrieval,caption,vqa,grounding", help="comma list, as for blipkit eval")
    args = p.parse_args()

    model = blipkit.load(args.model, dtype="float32")
    directory = blipkit.shipped_models().get(args.model, Path(args.model))
    runs = []
    for seed in seeds(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            write_dataset(tmp, 0, 0, args.images, seed=seed, image_size=128, progress=False)
            runs.append(evaluate(model, tmp, "test", tasks=args.tasks.split(","), k=args.k,
                                 num_beams=args.num_beams)["metrics"])
        print(seed, {k: runs[-1][k] for k in HEADLINE if k in runs[-1]}, flush=True)
    keys = [k for k in HEADLINE if k in runs[0]]
    mean = {k: round(statistics.mean(r[k] for r in runs), 2) for k in keys}
    std = {k: round(statistics.stdev(r[k] for r in runs), 2) for k in keys}
    tol = {k: round(max(3 * std[k], 10.0 if k == "CIDEr" else 5.0), 1) for k in keys}
    report = json.loads(Path(args.test).read_text())  # read last: the test evaluation may run alongside
    counts = report["counts"]
    out = {
        "model": directory.name,
        "test": {
            "data": f"{report['data']}, split {report['split']}: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
            "command": args.test_command,
            "metrics": report["metrics"],
        },
        "fresh": {
            "images": args.images, "k": args.k, "num_beams": args.num_beams, "seeds": seeds(args.seeds),
            "tasks": args.tasks.split(","),
            "protocol": f"write_dataset(root, 0, 0, {args.images}, seed=s, image_size=128); evaluate(model, root, "
                        f"'test', tasks, k={args.k}, num_beams={args.num_beams}); mean and sample std over the seeds; "
                        "tolerance = max(3 std, 5 points; CIDEr 10)",
            "mean": mean, "std": std, "tolerance": tol,
        },
    }
    (directory / "eval_results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["fresh"]["mean"]))


if __name__ == "__main__":
    main()
