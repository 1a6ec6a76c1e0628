"""The Ray executor against the local one on the same folder, and the stage rates a scaling estimate is built from.

    python benchmarks/bench_ray.py --images 256                      # scenes-blip (128 px), batches of 32
    python benchmarks/bench_ray.py --images 48 --model blip-itm-base-coco --size 384 --batch-size 16
    python benchmarks/bench_ray.py --job capfilt --images 128                # CapFilt: 2 sampled captions an image

Runs alternate (local, ray, local, ray) so a busy machine slows both alike; the fastest of each is kept. Ray is
started once (its start-up is printed apart); each Ray job still starts its actors and loads the model in them. Each
executor runs a job over the whole folder and one over its first half: the difference gives the marginal rate
(images/s once a job runs) and the fixed cost per job. Stage rates, each on one CPU thread as an actor or a decoding
task has it: decoding + preprocessing, the model's forward, and the driver's commit of one batch. With `--job capfilt`
the jobs are CapFilt runs (each scene's first caption as its web caption, `--samples` sampled ones), and the two
executors' candidates are compared. Nothing asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _scenes(folder: Path, n: int, size: int) -> list[Path]:
    """n generated JPEGs in `folder`, with `folder`.json: their first captions as CapFilt annotations."""
    from blipkit.data.scenes import iter_scenes

    folder.mkdir(parents=True, exist_ok=True)
    paths, annotations = [], []
    for i, scene in enumerate(iter_scenes(n, seed=3, image_size=size)):
        paths.append(folder / f"{i:06d}.jpg")
        scene.image.convert("RGB").save(paths[-1], quality=90)
        annotations.append({"image": str(paths[-1]), "caption": scene.captions[0]})
    folder.with_suffix(".json").write_text(json.dumps(annotations))
    return paths


def _job(out: Path, model, folder: Path, args, executor: str) -> float:
    """Wall seconds of one job into a new table (or CapFilt output directory)."""
    from blipkit.collections import Index
    from blipkit.collections.capfilt import capfilt
    from blipkit.collections.ray_executor import RayOptions

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    ray = RayOptions(actors=args.actors) if executor == "ray" else None
    if args.job == "capfilt":
        summary = capfilt(folder.with_suffix(".json"), out, model, samples=args.samples, batch_size=args.batch_size,
                          executor=executor, ray=ray).summary
    else:
        summary = Index(out, model).add(folder, batch_size=args.batch_size, executor=executor, ray=ray)
    seconds = time.perf_counter() - t
    assert summary.failed == 0, summary
    return seconds


def _same_candidates(a: Path, b: Path) -> str:
    """How the two executors' CapFilt candidates compare."""
    import pyarrow.parquet as pq

    ra, rb = (pq.read_table(d / "candidates.parquet").to_pylist() for d in (a, b))
    if len(ra) != len(rb):
        return f"{len(ra)} and {len(rb)} candidates: DIFFER"
    pairs = list(zip(ra, rb, strict=True))
    same = all({k: v for k, v in x.items() if k != "score"} == {k: v for k, v in y.items() if k != "score"}
               for x, y in pairs)
    gap = max((abs(x["score"] - y["score"]) for x, y in pairs), default=0.0)
    return f"{len(ra)} and {len(rb)} candidates, captions and verdicts {'equal' if same else 'DIFFER'}, " \
           f"largest score difference {gap:.1e}"


@torch.no_grad()
def stages(model, paths: list[Path], args) -> None:
    """Per-CPU rates of the three stages and the driver's commit time."""
    from blipkit.collections import Decoded, decode_batch, file_item, pixels
    from blipkit.collections.steps import EmbedStep
    from blipkit.collections.store import TableWriter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    items = [file_item(p) for p in paths[: args.batch_size * 2]]
    t = time.perf_counter()
    batch = decode_batch(items, model.processor)
    decode_rate = len(items) / (time.perf_counter() - t)
    step = EmbedStep(model)
    step(batch[: args.batch_size])  # warm-up
    t = time.perf_counter()
    columns = step(batch)
    model_rate = len(batch) / (time.perf_counter() - t)
    tmp = Path(tempfile.mkdtemp())
    commits = {}
    for rows in (args.batch_size, 1024):
        writer = TableWriter(tmp / f"db{rows}", "images", step.settings())
        reps = -(-rows // len(batch))  # the decoded batch repeated up to `rows` (new keys each time)
        big = [Decoded(file_item(f"{d.item.path}.{r}"), d.pixels, d.width, d.height) for r in range(reps)
               for d in batch][:rows]
        cols = {k: np.concatenate([np.asarray(v)] * reps)[:rows] for k, v in columns.items()}
        times = []
        for _ in range(5):
            t = time.perf_counter()
            writer.write(big, cols, [])
            times.append(time.perf_counter() - t)
        commits[rows] = sorted(times)[2]
    torch.set_num_threads(threads)
    shutil.rmtree(tmp)
    print(f"stages (one CPU thread each): decode {decode_rate:7.1f} img/s   model {model_rate:7.2f} img/s "
          f"({tuple(pixels(batch[:1]).shape[1:])})   commits from the driver: " + ", ".join(
              f"{rows} rows {1000 * t:.0f} ms ({rows / t:,.0f} rows/s)" for rows, t in commits.items()))


def main() -> None:
    """Local vs Ray ingest, then the stage rates."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=256, help="side of the generated JPEGs (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="scenes-blip", help="a shipped model, or a preset built with random weights")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stages-only", action="store_true", help="only the stage rates (no jobs, no Ray)")
    p.add_argument("--job", choices=("index", "capfilt"), default="index")
    p.add_argument("--samples", type=int, default=2, help="sampled captions an image (--job capfilt)")
    args = p.parse_args()

    import ray

    import blipkit

    model = blipkit.load(args.model) if args.model.startswith("scenes-") else blipkit.create(args.model)
    model.eval()
    tmp = Path(tempfile.mkdtemp())
    paths = _scenes(tmp / "imgs", args.images, args.size)
    if args.stages_only:
        stages(model, paths, args)
        shutil.rmtree(tmp)
        return
    half = tmp / "half"
    half.mkdir()
    for path in paths[: args.images // 2]:
        os.link(path, half / path.name)
    annotations = json.loads((tmp / "imgs.json").read_text())[: args.images // 2]  # CapFilt's: the same images
    (tmp / "half.json").write_text(json.dumps(annotations))
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    print(f"{args.job}: {args.model}, {args.images} images of {args.size} px, batches of {args.batch_size}, "
          f"{os.cpu_count()} CPUs, {args.actors} actor(s); Ray start-up {time.perf_counter() - t:.1f} s (once per "
          "driver)")
    try:
        runs: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for executor in ("local", "ray"):
                for folder in ("half", "imgs"):
                    runs.setdefault((executor, folder), []).append(
                        _job(tmp / f"db-{executor}", model, tmp / folder, args, executor))
    finally:
        ray.shutdown()
    best = {k: min(v) for k, v in runs.items()}
    n, extra = args.images, args.images - args.images // 2
    rate = {e: extra / max(best[e, "imgs"] - best[e, "half"], 1e-9) for e in ("local", "ray")}
    fixed = {e: best[e, "imgs"] - n / rate[e] for e in ("local", "ray")}
    local, remote = best["local", "imgs"], best["ray", "imgs"]
    print(f"whole job:   local {n / local:7.1f} img/s ({local:.1f} s)   ray {n / remote:7.1f} img/s ({remote:.1f} s)"
          f"   ray/local time {remote / local:.2f}x")
    print(f"marginal:    local {rate['local']:7.1f} img/s   ray {rate['ray']:7.1f} img/s   ray/local "
          f"{rate['ray'] / rate['local']:.2f}x   (the {extra} images a job of {n} has more than one of {n // 2})")
    print(f"fixed cost per job: local {fixed['local']:.1f} s   ray {fixed['ray']:.1f} s (actors start, each loads "
          "the model)")
    if args.job == "capfilt":
        print("same outputs:", _same_candidates(tmp / "db-local", tmp / "db-ray"))
    else:
        stages(model, paths, args)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
