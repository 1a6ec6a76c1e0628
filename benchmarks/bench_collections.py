"""Collections: ingestion overhead of `Index.add` over the model's own forward, ANN search latency and recall,
multivector search, sampled bulk captions batched vs one image at a time, the cost of a rerun over a fully indexed
folder, and the model on paper.

    python benchmarks/bench_collections.py ingest --images 256 --models scenes-blip
    python benchmarks/bench_collections.py ingest --images 24 --models blip-itm-base-coco
    python benchmarks/bench_collections.py search --rows 1000000 --queries 200
    python benchmarks/bench_collections.py multivector --rows 100000 --queries 10
    python benchmarks/bench_collections.py multivector --rows 100000 --queries 10 --rows-like scenes-blip2-itm
    python benchmarks/bench_collections.py multivector-real --rows 10000 --queries 50
    python benchmarks/bench_collections.py caption --images 64 --batch-size 16
    python benchmarks/bench_collections.py resume --images 10000
    python benchmarks/bench_collections.py paper

Each prints what it measured and the ratio against its target; nothing is asserted. Times are wall-clock and CPU
(process time: on a shared machine the CPU time of a query or an image is what it costs, the wall time also holds the
waits for the other processes); ingestion runs interleaved rounds and prints medians.
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


def _cpu_children() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@torch.no_grad()
def ingest(args: argparse.Namespace) -> None:
    """images/s of Index.add vs encode_images on the same pixels (decoded beforehand, not timed), in rounds.

    Each round times the forward pass, a job over all the images and one over half of them (fresh tables): the
    difference is the marginal cost of an image, without the fixed cost of a job (opening the table, compaction).
    Overheads printed: wall-clock; main-process CPU (what the model's process does besides the model: the overhead
    when decoding has cores of its own, as on any machine with more cores than model threads, or with a GPU); and
    all CPU, workers included (the overhead when decoding shares the model's cores).
    """
    import blipkit
    from blipkit.collections import Index

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    paths = _scenes(tmp / "imgs", args.images)
    for name in args.models:
        model = blipkit.load(name) if name in blipkit.shipped_models() else blipkit.create(name)
        model.eval()
        pixels = model.processor(paths)
        bs, n = args.batch_size, len(paths)
        _forward(model, pixels[:bs], bs)  # warm-up, and the first Index.add imports Lance
        Index(tmp / f"warm-{name}", model).add(paths[:bs], batch_size=bs, workers=args.workers)
        rounds = []
        for r in range(args.rounds):
            t, c = time.perf_counter(), time.process_time()
            _forward(model, pixels, bs)
            row = [time.perf_counter() - t, time.process_time() - c]
            for part, sources in (("all", tmp / "imgs"), ("half", paths[: n // 2])):
                t, c, k = time.perf_counter(), time.process_time(), _cpu_children()
                Index(tmp / f"db-{name}-{r}-{part}", model).add(sources, batch_size=bs, workers=args.workers)
                row += [time.perf_counter() - t, time.process_time() - c, _cpu_children() - k]
            rounds.append(row)
        fw, fc, iw, ic, kc, hw, hc, hk = np.median(np.array(rounds), axis=0)
        half = n - n // 2  # the images the whole job has more than the half job: the marginal cost
        mw, mc, mk = (iw - hw) / half, (ic - hc) / half, (kc - hk) / half
        print(f"ingest {name:<20} {n} images, batch {bs}, {args.threads} model thread(s), {args.workers} decoding "
              f"process(es), median of {args.rounds} interleaved rounds")
        print(f"  wall   model forward {n / fw:8.1f} img/s   index {n / iw:8.1f} img/s (whole job, "
              f"{100 * (iw / fw - 1):+.1f} %), {1 / mw:8.1f} img/s marginal ({100 * (mw * n / fw - 1):+.1f} %)")
        print(f"  CPU ms/img: model {1000 * fc / n:.2f}; index main process {1000 * ic / n:.2f} whole job, "
              f"{1000 * mc:.2f} marginal; decoding workers {1000 * kc / n:.2f}; fixed cost of a job "
              f"{ic - mc * n:.2f} s CPU")
        print(f"  overhead (marginal, CPU): main process {100 * (mc * n / fc - 1):+6.1f} %  (decoding on cores of "
              f"its own; target < 10 %)   all CPU {100 * ((mc + mk) * n / fc - 1):+6.1f} %  (decoding on the "
              "model's cores)")
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


def _latencies(ds, column: str, queries: np.ndarray, k: int, candidates: int = 0,
               **nearest) -> tuple[np.ndarray, np.ndarray, list]:
    """Wall and CPU milliseconds per query, and the ids found. With `candidates`, as blipkit searches a multivector
    column: that many rows from the index, re-scored exactly (Lance's refine), the best k kept."""
    wall, cpu, ids = [], [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        if candidates:
            nearest = {"k": candidates, "refine_factor": 1}
        r = ds.to_table(columns=["id", "_distance"],
                        nearest={"column": column, "q": q, "k": k, "metric": "cosine", **nearest})
        found = r.column("id").to_numpy()[np.argsort(r.column("_distance").to_numpy(), kind="stable")[:k]]
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        ids.append(found)
    return np.array(wall) * 1000, np.array(cpu) * 1000, ids


def _report(label: str, wall: np.ndarray, cpu: np.ndarray, recall: float | None = None, target: str = "") -> None:
    rec = f"  recall@10 {recall:.3f}" if recall is not None else ""
    print(f"{label:<50} p50 {np.percentile(wall, 50):8.2f} ms  p99 {np.percentile(wall, 99):8.2f} ms  (CPU p50 "
          f"{np.percentile(cpu, 50):7.2f} ms, p99 {np.percentile(cpu, 99):7.2f} ms){rec}{target}")


def _recall(found: list, exact: list) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, exact, strict=False)]))


def search(args: argparse.Namespace) -> None:
    """p50/p99 and recall@10 of the index blipkit builds (store.ensure_index) against exact search, on `rows`
    normalised 256-d vectors, at the default query settings (store / search) and a few others."""
    from blipkit.collections.search import DEFAULT_REFINE
    from blipkit.collections.store import ensure_index, vector_indices

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    vectors = _clustered(args.rows, 256, rng)
    queries = vectors[rng.integers(0, args.rows, args.queries)] + 0.02 * rng.normal(size=(args.queries, 256))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    exact = [np.argsort(-(vectors @ q))[:10] for q in queries]  # numpy: the truth
    ds = _table(str(tmp / "v.lance"), "embedding", vectors, 256)
    wall, cpu, ids = _latencies(ds, "embedding", queries[: args.exact_queries], 10, use_index=False)
    _report(f"exact (Lance, no index) {args.rows} rows", wall, cpu, _recall(ids, exact))
    t = time.perf_counter()
    kind = ensure_index(ds, {"dim": 256, "queries": 0}, args.ann)
    ds = type(ds)(ds.uri)
    print(f"{kind} build, as `blipkit index` builds it ({vector_indices(ds, 'embedding')}): "
          f"{time.perf_counter() - t:.0f} s")
    for nprobes, refine in ((None, DEFAULT_REFINE), (None, 20), (40, DEFAULT_REFINE), (None, None)):
        knobs = {k: v for k, v in (("nprobes", nprobes), ("refine_factor", refine)) if v is not None}
        wall, cpu, ids = _latencies(ds, "embedding", queries, 10, **knobs)
        label = f"{args.ann} {knobs or 'Lance defaults, no refine'}" + (" (blipkit's default)" if knobs == {
            "refine_factor": DEFAULT_REFINE} else "")
        _report(label, wall, cpu, _recall(ids, exact), "  (targets: p50 <= 10 ms, recall >= 0.95)")
    shutil.rmtree(tmp)


def _model_rows(name: str, images: int) -> np.ndarray:
    """The normalised query vectors (images, Q, D) of a shipped BLIP-2 model on generated scenes."""
    import blipkit
    from blipkit.data.scenes import iter_scenes

    model = blipkit.load(name).eval()
    size = model.config.vision_config.image_size
    scenes = [s.image for s in iter_scenes(images, seed=3, image_size=size)]
    with torch.no_grad():
        out = [model.encode_images(model.image_features(model.pixels(scenes[s : s + 64]))).float()
               for s in range(0, len(scenes), 64)]
    return torch.cat(out).numpy()


def _structure(vectors: np.ndarray) -> str:
    """How alike a row's vectors are: mean cosine of two vectors of one row; per query index, the mean cosine of
    that vector across two rows (1: a query that is the same for every image)."""
    n, q, _ = vectors.shape
    half = min(n // 2, 1000)
    a, b = vectors[:half], vectors[half : 2 * half]
    pairs = np.triu_indices(q, 1)
    within = np.einsum("nqd,npd->nqp", a, a)[:, pairs[0], pairs[1]]
    across = np.einsum("nqd,nqd->nq", a, b).mean(0)  # row i vs row half + i, same query index
    return (f"within a row: cosine of two vectors mean {within.mean():.3f} (p5 {np.percentile(within, 5):.3f}, "
            f"p95 {np.percentile(within, 95):.3f}); same query index across rows: "
            f"{' '.join(f'{x:.2f}' for x in np.sort(across))}")


def _fitted_rows(real: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` rows drawn from a Gaussian fitted to real rows (mean and full covariance of a row's Q x D values),
    each vector then normalised: rows alike within themselves as the model's are, in the model's own shape."""
    n, q, d = real.shape
    flat = real.reshape(n, q * d).astype(np.float64)
    mean = flat.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(flat, rowvar=False))
    keep = vals > 1e-9
    basis = (vecs[:, keep] * np.sqrt(vals[keep])).T.astype(np.float32)  # (r, Q*D)
    out = np.empty((rows, q, d), dtype=np.float32)
    for s in range(0, rows, 20_000):
        m = min(20_000, rows - s)
        x = (mean + rng.normal(size=(m, len(basis))).astype(np.float32) @ basis).reshape(m, q, d)
        out[s : s + m] = x / np.linalg.norm(x, axis=2, keepdims=True)
    return out


def multivector(args: argparse.Namespace) -> None:
    """MaxSim search over `rows` x Q query vectors (BLIP-2) with one text vector as the query, against numpy's
    MaxSim: Lance's exact multivector search, then the index blipkit builds searched as `search_text` does.

    Rows: `independent` (Q random vectors a row around 2,000 centres, Q x dim as given), or like a shipped BLIP-2
    model's (`--rows-like scenes-blip2-itm`: its query vectors on `--fit-images` generated scenes are measured, then
    rows are drawn from a Gaussian fitted to them, in the model's own Q x D). Queries: a random vector of a random row
    plus noise (0.02 a dimension), normalised.
    """
    from blipkit.collections.search import DEFAULT_REFINE, multivector_candidates

    rng = np.random.default_rng(1)
    tmp = Path(tempfile.mkdtemp())
    if args.rows_like == "independent":
        vectors = _clustered(args.rows * 32, args.dim, rng).reshape(args.rows, 32, args.dim)
    else:
        real = _model_rows(args.rows_like, args.fit_images)
        print(f"{args.rows_like} on {args.fit_images} generated scenes ({real.shape[1]} x {real.shape[2]}): "
              f"{_structure(real)}")
        vectors = _fitted_rows(real, args.rows, rng)
    n, q, dim = vectors.shape
    print(f"rows ({args.rows_like}, {n} x {q} x {dim}): {_structure(vectors)}")
    ds = _table(str(tmp / "mv.lance"), "queries", vectors, dim, multivector=q)
    queries = vectors[rng.integers(0, n, args.queries), rng.integers(0, q, args.queries)]
    queries = queries + 0.02 * rng.normal(size=queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = [np.argsort(-np.einsum("nqd,d->nq", vectors, x).max(1))[:10] for x in queries]
    if args.exact_queries:
        wall, cpu, ids = _latencies(ds, "queries", queries[: args.exact_queries], 10, use_index=False)
        _report("exact MaxSim (Lance, no index)", wall, cpu, _recall(ids, exact))
    if args.ann != "none":  # the index `blipkit index` builds on a BLIP-2 table
        from blipkit.collections.store import ensure_index

        t = time.perf_counter()
        kind = ensure_index(ds, {"dim": dim, "queries": q}, args.ann)
        print(f"{kind} build on the multivector column: {time.perf_counter() - t:.0f} s")
        ds = type(ds)(ds.uri)
        wall, cpu, ids = _latencies(ds, "queries", queries, 10, refine_factor=DEFAULT_REFINE)
        _report(f"{kind} k 10, Lance refine {DEFAULT_REFINE} (before)", wall, cpu, _recall(ids, exact))
        default = multivector_candidates(10)
        for candidates in sorted({*args.candidates, default}):
            wall, cpu, ids = _latencies(ds, "queries", queries, 10, candidates=candidates)
            label = f"{kind} {candidates} candidates, exact MaxSim" + (" (default)" if candidates == default else "")
            _report(label, wall, cpu, _recall(ids, exact), "  (target: recall >= 0.95)")
    shutil.rmtree(tmp)


def multivector_real(args: argparse.Namespace) -> None:
    """BLIP-2 search end to end on real embeddings: `Index.add` of generated scenes with scenes-blip2-itm and an
    IVF-PQ index, then `search_text` (ITC only) with captions of other scenes as queries, against numpy's MaxSim over
    the stored query vectors; and the first stage as it was (k, refine 20) on the same table."""
    import blipkit
    from blipkit.collections import Index
    from blipkit.collections.search import DEFAULT_REFINE
    from blipkit.data.scenes import iter_scenes
    from blipkit.tasks.common import encode_texts

    tmp = Path(tempfile.mkdtemp())
    model = blipkit.load("scenes-blip2-itm")
    _scenes(tmp / "imgs", args.rows)
    t = time.perf_counter()
    index = Index(tmp / "db", model, ann="ivf_pq")
    index.add(tmp / "imgs", batch_size=64)
    print(f"indexed {args.rows} scenes with scenes-blip2-itm and IVF-PQ in {time.perf_counter() - t:.0f} s")
    stored = index.to_arrow(["path", "queries"])
    paths = stored.column("path").to_pylist()
    q, d = model.config.num_query_tokens, model.config.image_text_hidden_size
    vectors = stored.column("queries").combine_chunks().flatten().flatten().to_numpy().reshape(len(paths), q, d)
    texts = [s.captions[0] for s in iter_scenes(args.rows + args.queries, seed=1)][args.rows :]
    with torch.no_grad():
        emb = encode_texts(model, texts).float().numpy()
    exact = [[paths[i] for i in np.argsort(-np.einsum("nqd,d->nq", vectors, e).max(1))[:10]] for e in emb]
    import lance

    ds = lance.dataset(str(tmp / "db" / "images.lance"))
    before = [ds.to_table(columns=["path"], nearest={"column": "queries", "q": e, "k": 10, "metric": "cosine",
                                                     "refine_factor": DEFAULT_REFINE}).column("path").to_pylist()
              for e in emb]
    wall, cpu, found = [], [], []
    for text in texts:
        t, c = time.perf_counter(), time.process_time()
        found.append([h["path"] for h in index.search_text(text, k=10, rerank=0)])
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    print(f"{args.queries} caption queries (other scenes' first captions), recall@10 against numpy's MaxSim:")
    print(f"  first stage as before (k 10, refine 20): {_recall(before, exact):.3f}")
    _report("  search_text(k=10, rerank=0), the default", np.array(wall) * 1000, np.array(cpu) * 1000,
            _recall(found, exact))
    shutil.rmtree(tmp)


@torch.no_grad()
def caption(args: argparse.Namespace) -> None:
    """Sampled captions/s of `CaptionStep` (the batch decoded at once, one generator per image) against one image at
    a time from torch's seeded generator (how sampled bulk captions ran before), on the same decoded images, in
    interleaved rounds; the captions of both sides must be equal."""
    import blipkit
    from blipkit.collections import CaptionStep, decode_batch, read_sources
    from blipkit.collections.caption import item_seed

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    _scenes(tmp / "imgs", args.images)
    for name in args.models:
        model = blipkit.load(name)
        options = {"do_sample": True, "top_p": 0.9, "max_new_tokens": args.max_new_tokens}
        step = CaptionStep(model, seed=1, **options)
        decoded = decode_batch(list(read_sources(tmp / "imgs")), model.processor)
        batches = [decoded[s : s + args.batch_size] for s in range(0, len(decoded), args.batch_size)]

        def one_at_a_time(batch, model=model, options=options):
            feats = model.image_features(torch.from_numpy(np.stack([d.pixels for d in batch])))
            out = []
            for i, d in enumerate(batch):
                with torch.random.fork_rng():
                    torch.manual_seed(item_seed(1, d.item.key))
                    out += model.caption(feats[i : i + 1], **options)
            return out

        step(batches[0])  # warm-up
        times: dict[str, list[float]] = {"batched": [], "alone": []}
        for _ in range(args.rounds):
            for side in times:
                t = time.perf_counter()
                got = [c for b in batches for c in (step(b)["caption"] if side == "batched" else one_at_a_time(b))]
                times[side].append(time.perf_counter() - t)
                if side == "batched":
                    batched = got
                else:
                    assert got == batched, "batched sampling must give the captions of one image at a time"
        b, a = np.median(times["batched"]), np.median(times["alone"])
        print(f"caption {name:<18} {len(decoded)} images, batch {args.batch_size}, nucleus top_p 0.9, "
              f"<= {args.max_new_tokens} tokens, {args.threads} thread(s), median of {args.rounds} rounds: "
              f"one at a time {len(decoded) / a:6.1f} captions/s, batched {len(decoded) / b:6.1f} captions/s "
              f"({a / b:.2f}x); captions equal")
    shutil.rmtree(tmp)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def resume(args: argparse.Namespace) -> None:
    """First run vs rerun over a folder of small generated images; the table's bytes per row."""
    import blipkit
    from blipkit.collections import Index

    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    _scenes(tmp / "imgs", args.images, size=64)
    print(f"wrote {args.images} images in {time.perf_counter() - t:.1f} s")
    model = blipkit.load("scenes-blip")
    runs = []
    for _ in range(2):
        t, c = time.perf_counter(), time.process_time()
        summary = Index(tmp / "db", model).add(tmp / "imgs", batch_size=64, workers=args.workers)
        runs.append((time.perf_counter() - t, time.process_time() - c))
        print(f"  added {summary.added}, skipped {summary.skipped} in {runs[-1][0]:.2f} s ({runs[-1][1]:.2f} s CPU)")
    print(f"rerun over {args.images} indexed images: {runs[1][0]:.2f} s = {100 * runs[1][0] / runs[0][0]:.2f} % of "
          f"the first run's {runs[0][0]:.1f} s; CPU {100 * runs[1][1] / runs[0][1]:.2f} %  (target <= 5 %)")
    table = tmp / "db" / "images.lance"
    print(f"table on disk: {_dir_bytes(table) / args.images:.0f} bytes a row (scenes-blip: 128-d embedding, key, path)")
    shutil.rmtree(tmp)


def paper(args: argparse.Namespace) -> None:
    """The model on paper: bytes a row per stored column (from the configs), and what an image costs to embed
    (ViT FLOPs; per-core rates from `--model-ms` / `--decode-ms` measured with `ingest`)."""
    from blipkit.blip2_config import PRESETS as PRESETS2
    from blipkit.config import PRESETS

    rows = []
    for name, (_, cfg) in (("blip-itm-base-coco", PRESETS["blip-itm-base-coco"]),
                           ("blip-itm-large-coco", PRESETS["blip-itm-large-coco"]),
                           ("blip2-itm-vit-g", PRESETS2["blip2-itm-vit-g"])):
        v = cfg.vision_config
        tokens = 1 + (v.image_size // v.patch_size) ** 2
        d = cfg.image_text_hidden_size
        q = getattr(cfg, "num_query_tokens", 0)
        params = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
        flops = 2 * params * tokens + v.num_hidden_layers * 4 * tokens**2 * v.hidden_size
        cols = {"embedding": 4 * d, "queries": 4 * q * d, "features (fp16)": 2 * tokens * v.hidden_size}
        rows.append((name, flops, cols))
    print("GB per million images (1e9 bytes), data only (Lance adds a few %; key + path ~ 100-200 B a row):")
    for name, _, cols in rows:
        shown = ", ".join(f"{c} {b / 1e3:.1f} KB = {b / 1e3:.1f} GB/M" for c, b in cols.items() if b)
        print(f"  {name:<22} {shown}")
    print(f"images/s on paper (ViT forward FLOPs; a GPU at {args.gpu_tflops:g} TFLOP/s x {args.mfu:g} utilisation; "
          f"decoding {args.decode_ms:g} ms CPU an image):")
    for name, flops, _ in rows:
        gpu = args.gpu_tflops * 1e12 * args.mfu / flops
        print(f"  {name:<22} {flops / 1e9:6.0f} GFLOP/img   GPU {gpu:7.0f} img/s, needs "
              f"{gpu * args.decode_ms / 1000:4.1f} decoding cores   CPU core at {args.cpu_gflops:g} GFLOP/s: "
              f"{args.cpu_gflops * 1e9 / flops:5.2f} img/s")


def main() -> None:
    """Run one benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("ingest")
    s.add_argument("--images", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--models", nargs="+", default=["scenes-blip", "blip-itm-base-coco"],
                   help="shipped models load their weights; presets are built with random weights")
    s.add_argument("--workers", type=int, default=1, help="decoding processes")
    s.add_argument("--threads", type=int, default=1, help="torch threads of the model (both sides)")
    s.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("search")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--exact-queries", type=int, default=20)
    s.add_argument("--ann", default="ivf_pq", choices=["ivf_pq", "hnsw"])
    s = sub.add_parser("multivector")
    s.add_argument("--rows", type=int, default=100_000)
    s.add_argument("--dim", type=int, default=256, help="vector width of independent rows")
    s.add_argument("--rows-like", default="independent", choices=["independent", "scenes-blip2-itm"],
                   help="independent random vectors (32 a row), or rows fitted to this model's query vectors")
    s.add_argument("--fit-images", type=int, default=2000, help="generated scenes the fit measures")
    s.add_argument("--queries", type=int, default=20)
    s.add_argument("--exact-queries", type=int, default=3, help="queries timed without the index (slow)")
    s.add_argument("--candidates", type=int, nargs="*", default=[200, 400, 1600], help="candidate rows to compare")
    s.add_argument("--ann", default="ivf_pq", choices=["none", "ivf_pq", "hnsw"], help="also with this index")
    s = sub.add_parser("multivector-real")
    s.add_argument("--rows", type=int, default=10_000, help="generated scenes to index")
    s.add_argument("--queries", type=int, default=50)
    s = sub.add_parser("caption")
    s.add_argument("--images", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--models", nargs="+", default=["scenes-blip", "scenes-blip2-opt"])
    s.add_argument("--max-new-tokens", type=int, default=20)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("resume")
    s.add_argument("--images", type=int, default=10_000)
    s.add_argument("--workers", type=int, default=None)
    s = sub.add_parser("paper")
    s.add_argument("--gpu-tflops", type=float, default=312, help="peak dense bf16 (A100: 312)")
    s.add_argument("--mfu", type=float, default=0.4, help="fraction of the peak a ViT forward reaches")
    s.add_argument("--cpu-gflops", type=float, default=50, help="what one core sustains in float32 matmuls")
    s.add_argument("--decode-ms", type=float, default=10, help="CPU ms to decode and resize one photo")
    args = p.parse_args()
    {"ingest": ingest, "search": search, "multivector": multivector, "multivector-real": multivector_real,
     "caption": caption, "resume": resume, "paper": paper}[args.what](args)


if __name__ == "__main__":
    main()
