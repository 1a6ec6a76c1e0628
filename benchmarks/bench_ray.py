"""The Ray executor against the local one on the same folder, and the stage rates a scaling estimate is built from.

    python benchmarks/bench_ray.py --images 256                      # scenes-blip (128 px), batches of 32
    python benchmarks/bench_ray.py --images 48 --model blip-itm-base-coco --size 384 --batch-size 16

Runs alternate (local, ray, local, ray) so a busy machine slows both alike; the fastest of each is kept. Ray is
started once (its start-up is printed apart); each Ray job still starts its actors and loads the model in them. Each
executor runs a job over the whole folder and one over its first half: the difference gives the marginal rate
(images/s once a job runs) and the fixed cost per job. Stage rates, each on one CPU thread as an actor or a decoding
task has it: decoding + preprocessing, the model's forward, and the driver's commit of one batch. Nothing asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _scenes(folder: Path, n: int, size: int) -> list[Path]:
    from blipkit.data.scenes import iter_scenes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(iter_scenes(n, seed=3, image_size=size)):
        paths.append(folder / f"{i:06d}.jpg")
        scene.image.convert("RGB").save(paths[-1], quality=90)
    return paths


def _job(index_dir: Path, model, folder: Path, args, executor: str) -> float:
    """Wall seconds of one job into a new table."""
    from blipkit.collections import Index
    from blipkit.collections.ray_executor import RayOptions

    shutil.rmtree(index_dir, ignore_errors=True)
    t = time.perf_counter()
    ray = RayOptions(actors=args.actors) if executor == "ray" else None
    summary = Index(index_dir, model).add(folder, batch_size=args.batch_size, executor=executor, ray=ray)
    seconds = time.perf_counter() - t
    assert summary.failed == 0, summary
    return seconds


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
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    print(f"{args.model}, {args.images} images of {args.size} px, batches of {args.batch_size}, {os.cpu_count()} "
          f"CPUs, {args.actors} actor(s); Ray start-up {time.perf_counter() - t:.1f} s (once per driver)")
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
    stages(model, paths, args)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
