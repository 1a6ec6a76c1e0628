"""Collections: ingestion overhead of `Index.add` over the model's own forward, ANN search latency and recall,
multivector search, and the cost of a rerun over a fully indexed folder.

    python benchmarks/bench_collections.py ingest --images 48
    python benchmarks/bench_collections.py search --rows 1000000 --queries 200
    python benchmarks/bench_collections.py multivector --rows 100000
    python benchmarks/bench_collections.py resume --images 10000

Each prints what it measured and the ratio against its target; nothing is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _scenes(folder: Path, n: int, size: int = 128) -> list[Path]:
    from blipkit.data.scenes import iter_scenes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(iter_scenes(n, seed=1, image_size=size)):
        paths.append(folder / f"{i:06d}.png")
        scene.image.save(paths[-1], compress_level=1)
    return paths


@torch.no_grad()
def _forward(model, pixels: torch.Tensor, bs: int) -> None:
    for s in range(0, len(pixels), bs):
        model.encode_images(model.image_features(pixels[s : s + bs]))


@torch.no_grad()
def ingest(args: argparse.Namespace) -> None:
    """images/s of Index.add vs encode_images on the same pixels (decoded beforehand, not timed)."""
    import blipkit
    from blipkit.collections import Index

    tmp = Path(tempfile.mkdtemp())
    paths = _scenes(tmp / "imgs", args.images)
    for name in args.models:
        model = blipkit.load(name) if name == "scenes-blip" else blipkit.create(name)
        model.eval()
        pixels = model.processor(paths)
        bs = args.batch_size

        _forward(model, pixels, bs)  # warm-up
        t = time.perf_counter()
        _forward(model, pixels, bs)
        t_model = time.perf_counter() - t
        best = float("inf")
        for r in range(2):
            db = tmp / f"db-{name}-{r}"
            t = time.perf_counter()
            Index(db, model).add(tmp / "imgs", batch_size=bs, workers=args.workers)
            best = min(best, time.perf_counter() - t)
        n = len(paths)
        print(f"ingest {name:<20} model forward {n / t_model:7.1f} img/s   index {n / best:7.1f} img/s   "
              f"overhead {100 * (best / t_model - 1):+6.1f} %  (target < 10 %)")
    shutil.rmtree(tmp)


def _clustered(rows: int, dim: int, rng: np.random.Generator, centres: int = 2000) -> np.ndarray:
    """Normalised vectors around `centres` random directions (embeddings cluster; uniform noise does not)."""
    c = rng.normal(size=(centres, dim)).astype(np.float32)
    out = np.empty((rows, dim), dtype=np.float32)
    for s in range(0, rows, 100_000):
        n = min(100_000, rows - s)
        x = c[rng.integers(0, centres, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim) * 8
        out[s : s + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _table(uri: str, column: str, values, dim: int, multivector: int = 0):
    import lance
    import pyarrow as pa

    if multivector:
        inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
        col = pa.ListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int32) * multivector), inner)
    else:
        col = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
    table = pa.table({"id": np.arange(len(values)), column: col})
    return lance.write_dataset(table, uri, mode="overwrite", max_rows_per_file=1 << 22)


def _latencies(ds, column: str, queries: np.ndarray, k: int, **nearest) -> tuple[np.ndarray, list[np.ndarray]]:
    times, ids = [], []
    for q in queries:
        t = time.perf_counter()
        r = ds.to_table(columns=["id"], nearest={"column": column, "q": q, "k": k, "metric": "cosine", **nearest})
        times.append(time.perf_counter() - t)
        ids.append(r.column("id").to_numpy())
    return np.array(times) * 1000, ids


def search(args: argparse.Namespace) -> None:
    """p50/p99 and recall@10 of IVF-PQ against exact search on `rows` normalised 256-d vectors."""
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    vectors = _clustered(args.rows, 256, rng)
    queries = vectors[rng.integers(0, args.rows, args.queries)] + 0.02 * rng.normal(size=(args.queries, 256))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    ds = _table(str(tmp / "v.lance"), "embedding", vectors, 256)
    t_exact, exact = _latencies(ds, "embedding", queries[: args.exact_queries], 10, use_index=False)
    p50, p99 = np.percentile(t_exact, [50, 99])
    print(f"exact  {args.rows:>9} rows  p50 {p50:8.2f} ms  p99 {p99:8.2f} ms")
    t = time.perf_counter()
    partitions = int(np.sqrt(args.rows))
    ds.create_index("embedding", "IVF_PQ", metric="cosine", num_partitions=partitions, num_sub_vectors=32)
    print(f"IVF_PQ build ({partitions} partitions, 32 sub-vectors): {time.perf_counter() - t:.1f} s")
    for nprobes, refine in ((20, 10), (40, 20), (64, 40)):
        lat, ids = _latencies(ds, "embedding", queries, 10, nprobes=nprobes, refine_factor=refine)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=False)])
        print(f"ivf_pq nprobes {nprobes:3d} refine {refine:3d}  p50 {np.percentile(lat, 50):7.2f} ms  "
              f"p99 {np.percentile(lat, 99):7.2f} ms  recall@10 {recall:.3f}  (targets: p50 <= 10 ms, >= 0.95)")
    shutil.rmtree(tmp)


def multivector(args: argparse.Namespace) -> None:
    """MaxSim search over `rows` x 32 query vectors (BLIP-2), exact, with one text vector as the query."""
    rng = np.random.default_rng(1)
    tmp = Path(tempfile.mkdtemp())
    vectors = _clustered(args.rows * 32, args.dim, rng).reshape(args.rows, 32, args.dim)
    ds = _table(str(tmp / "mv.lance"), "queries", vectors, args.dim, multivector=32)
    queries = vectors[rng.integers(0, args.rows, args.queries), rng.integers(0, 32)]
    lat, ids = _latencies(ds, "queries", queries, 10)
    best = np.einsum("nqd,d->nq", vectors, queries[0]).max(1).argsort()[::-1][:10]
    print(f"multivector {args.rows} x 32 x {args.dim} exact MaxSim  p50 {np.percentile(lat, 50):8.2f} ms  "
          f"p99 {np.percentile(lat, 99):8.2f} ms  top-10 equals numpy: {sorted(ids[0]) == sorted(best)}")
    shutil.rmtree(tmp)


def resume(args: argparse.Namespace) -> None:
    """First run vs rerun over a folder of small generated images."""
    import blipkit
    from blipkit.collections import Index

    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    _scenes(tmp / "imgs", args.images, size=64)
    print(f"wrote {args.images} images in {time.perf_counter() - t:.1f} s")
    model = blipkit.load("scenes-blip")
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        summary = Index(tmp / "db", model).add(tmp / "imgs", batch_size=64, workers=args.workers)
        runs.append(time.perf_counter() - t)
        print(f"  added {summary.added}, skipped {summary.skipped} in {runs[-1]:.2f} s")
    print(f"resume over {args.images} indexed images: {runs[1]:.2f} s = {100 * runs[1] / runs[0]:.2f} % of the "
          f"first run ({runs[0]:.1f} s)  (target <= 5 %)")
    shutil.rmtree(tmp)


def main() -> None:
    """Run one benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("ingest")
    s.add_argument("--images", type=int, default=48)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--models", nargs="+", default=["scenes-blip", "blip-itm-base-coco"],
                   help="shipped models load their weights; presets are built with random weights")
    s.add_argument("--workers", type=int, default=None)
    s = sub.add_parser("search")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--exact-queries", type=int, default=50)
    s = sub.add_parser("multivector")
    s.add_argument("--rows", type=int, default=100_000)
    s.add_argument("--dim", type=int, default=256)
    s.add_argument("--queries", type=int, default=20)
    s = sub.add_parser("resume")
    s.add_argument("--images", type=int, default=10_000)
    s.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    {"ingest": ingest, "search": search, "multivector": multivector, "resume": resume}[args.what](args)


if __name__ == "__main__":
    main()
