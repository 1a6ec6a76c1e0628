"""The local driver of a bulk job: reader -> (skip done keys) -> decode in worker processes -> step -> writer.

A job is three pieces, each usable on its own and by other drivers (e.g. Ray Data's `map_batches`):
- a reader: any iterable of `readers.Item` (stable `key`, `path`, where the bytes are); `readers.read_sources`;
- a `Step`: `processor` (the `ImageProcessor` workers preprocess with) and `__call__(batch: list[Decoded]) ->
  {column: values}`, one value per decoded item (`pixels(batch)` stacks their pixels into a tensor);
- a `Writer`: `done(keys) -> list[bool]` (what an earlier run already wrote: those items are skipped before any
  decode or model call), `write(batch, columns, failures)` which commits one batch atomically (a crash loses at
  most the batch in flight), and `finish() -> dict` (indexes, compaction, merging; extra fields for the summary).
  `store.TableWriter` (LanceDB) and the file writers of `writers` (caption sidecars, JSON lines, Parquet) are
  the ones there are.

`run_job` streams: items are filtered in chunks, decoded `batch_size` at a time by `workers` processes (at most
two batches per worker in flight, so memory stays flat however large the collection), and each batch is run
through the step and committed before the next result is taken, in the reader's order. Progress (images/s, ETA)
goes to stderr.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import InputError
from ..processing import ImageProcessor
from .decode import DEFAULT_MAX_PIXELS, Decoded, Failure, decode_batch, normalise
from .readers import Item

FILTER_CHUNK = 1024  # items checked against the writer's done keys at a time
COMMIT_SECONDS = 1.0  # results are committed at least this far apart (see `run_job`)


class Step(Protocol):
    """A batched step: decoded images -> columns (one value per image)."""

    processor: ImageProcessor

    def __call__(self, batch: list[Decoded]) -> dict[str, Any]: ...


class Writer(Protocol):
    """Where results go: knows what is done, commits batches atomically."""

    def done(self, keys: list[str]) -> list[bool]: ...

    def write(self, batch: list[Decoded], columns: dict[str, Any], failures: list[Failure]) -> None: ...

    def finish(self) -> dict[str, Any]: ...


@dataclass
class Summary:
    """What a job did: items added, skipped (done by an earlier run or named twice), failed (with error records)."""

    added: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Added and failed items per second of the whole job."""
        return (self.added + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        out = asdict(self)
        out.update(out.pop("extra"), seconds=round(self.seconds, 3), images_per_second=round(self.images_per_second, 2))
        return out


def key_hash(key: str) -> int:
    """A 64-bit hash of a key (what done-key sets hold: 8 bytes an item instead of the string)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little",
                          signed=True)


def pixels(batch: list[Decoded]) -> torch.Tensor:
    """The preprocessed pixels of a batch, (N, 3, H, W) float32 (no copy when they are the rows, in order, of one
    array, as `decode.normalise` makes them)."""
    if batch:
        base = batch[0].pixels.base
        if (isinstance(base, np.ndarray) and base.ndim == 4 and base.shape[0] == len(batch) and base.dtype == np.float32
                and base.flags.c_contiguous and all(d.pixels.base is base for d in batch)):
            start, step = base.__array_interface__["data"][0], base.strides[0]
            if all(d.pixels.__array_interface__["data"][0] == start + j * step for j, d in enumerate(batch)):
                return torch.from_numpy(base)
    return torch.from_numpy(np.stack([d.pixels for d in batch]))


def default_workers() -> int:
    """Decoding processes by default: all cores but one for the model, at least one, at most four."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _pending(items: Iterable[Item], writer: Writer, summary: Summary, bar) -> Iterator[Item]:
    """The items not done yet (checked in chunks); each key once per run."""
    seen: set[int] = set()
    it = iter(items)
    while chunk := list(islice(it, FILTER_CHUNK)):
        done = writer.done([item.key for item in chunk])
        for item, was_done in zip(chunk, done, strict=True):
            h = key_hash(item.key)
            if was_done or h in seen:
                summary.skipped += 1
                bar.update(1)
                continue
            seen.add(h)
            yield item


class _Pending:
    """Results waiting for their commit: batches gathered until `seconds` passed since the writer's last commit."""

    def __init__(self, writer: Writer, seconds: float) -> None:
        self.writer, self.seconds, self.last = writer, seconds, time.perf_counter()
        self.batch: list[Decoded] = []
        self.columns: list[dict[str, Any]] = []
        self.failures: list[Failure] = []

    def add(self, batch: list[Decoded], columns: dict[str, Any], failures: list[Failure]) -> None:
        # the pixels are dropped: writers store the items, sizes and columns
        self.batch += [Decoded(d.item, None, d.width, d.height) for d in batch]
        if batch:
            self.columns.append(columns)
        self.failures += failures
        if time.perf_counter() - self.last >= self.seconds:
            self.commit()

    def commit(self) -> None:
        if self.batch or self.failures:
            self.writer.write(self.batch, _concat(self.columns), self.failures)
        self.batch, self.columns, self.failures, self.last = [], [], [], time.perf_counter()


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The columns of several batches as one: arrays concatenated, lists joined."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for name in parts[0] if parts else ():
        values = [p[name] for p in parts]
        out[name] = np.concatenate(values) if all(isinstance(v, np.ndarray) for v in values) else \
            [x for v in values for x in v]
    return out


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while batch := list(islice(items, size)):
        yield batch


def _init_worker() -> None:
    torch.set_num_threads(1)  # decoding is per-process parallel; the model keeps the machine's threads


def _context():
    """As torch's DataLoader: fork on Linux (fast, and it works whatever `__main__` is), spawn elsewhere."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def run_job(
    items: Iterable[Item],
    step: Step,
    writer: Writer,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    desc: str = "images",
    commit_seconds: float = COMMIT_SECONDS,
) -> Summary:
    """Run a job over `items` (see the module docstring); returns its Summary.

    Args:
        batch_size: images per model call.
        workers: decoding processes (0 decodes in this process; default: `default_workers()`).
        max_pixels: images with more pixels are refused as decompression bombs.
        commit_seconds: the results of consecutive batches go to the writer together, once this long has passed
            since its last commit (0: every batch). A kill loses at most that much work and the batch in flight;
            a commit costs tens of milliseconds, so a fast model would otherwise spend a fifth of its time there.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: use 1 or more")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise InputError(f"workers={workers}: use 0 (decode in this process) or more")
    if not commit_seconds >= 0:
        raise InputError(f"commit_seconds={commit_seconds}: use 0 (commit every batch) or more")
    start = time.perf_counter()
    summary = Summary()
    total = items.count() if progress and hasattr(items, "count") else None
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, smoothing=0.1) as bar:
        batches = _batches(_pending(items, writer, summary, bar), batch_size)
        pending = _Pending(writer, commit_seconds)
        for results in _decoded(batches, step.processor, workers, max_pixels):
            ok = [r for r in results if isinstance(r, Decoded)]
            failures = [r for r in results if isinstance(r, Failure)]
            pending.add(ok, step(ok) if ok else {}, failures)
            summary.added += len(ok)
            summary.failed += len(failures)
            bar.update(len(results))
            bar.set_postfix(added=summary.added, skipped=summary.skipped, failed=summary.failed, refresh=False)
        pending.commit()
    summary.extra = writer.finish()
    summary.seconds = time.perf_counter() - start
    return summary


def _decoded(batches: Iterator[list[Item]], processor: ImageProcessor, workers: int, max_pixels: int
             ) -> Iterator[list[Decoded | Failure]]:
    """Decoded batches in order; with workers, up to two batches per worker are decoded ahead of the step (they send
    uint8 images back, normalised here: a quarter of the bytes of float pixels)."""
    if workers == 0:
        for batch in batches:
            yield decode_batch(batch, processor, max_pixels)
        return
    first = next(batches, None)
    if first is None:
        return  # nothing to do: no process is started
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_init_worker)
    try:
        with warnings.catch_warnings():
            # LanceDB warns at every fork; the workers only decode images and never touch a table
            warnings.filterwarnings("ignore", message=".*(lance|lancedb).*fork", category=Warning)
            ahead: deque[Future] = deque([pool.submit(decode_batch, first, processor, max_pixels, True)])
        for batch in batches:
            ahead.append(pool.submit(decode_batch, batch, processor, max_pixels, True))
            if len(ahead) >= 2 * workers:
                yield normalise(ahead.popleft().result(), processor)
        while ahead:
            yield normalise(ahead.popleft().result(), processor)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
