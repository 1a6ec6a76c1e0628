"""The Ray driver of a bulk job: the same reader -> step -> writer as `engine.run_job`, on Ray Data.

    reader (driver): done keys skipped, pending items -> Arrow blocks in the object store
      -> map_batches(decode)      Ray tasks, one CPU each: bytes -> the resized image (uint8), or a failure reason
      -> map_batches(StepActor)   an actor pool, one step (one model) per actor, `gpus_per_actor` GPUs each:
                                  the processor's float pixels (`decode.normalise`) -> the step's columns
      -> iter_batches (driver)    -> writer.write: one atomic commit per `commit_rows` rows, as the local driver

The writer stays on the driver: the table gets the same schema, keys and metadata as with `run_job`, done keys are
skipped before any decode or model call, and a job killed at any moment (driver or worker) loses at most the batches
not yet committed. A worker that dies is retried by Ray; since only the driver writes, a retried task cannot write a
row twice. (`Dataset.write_lance` writes fragments from the workers and commits once at the end: a kill would lose
the whole job, and it knows neither the errors table nor edited files.)

The step is built inside each actor by a picklable `make_step()` (`ModelStep`: the model loaded from its name on
the actor's node, or shipped through the object store when given as a model), on CUDA when the actor has a GPU.
`pip install 'blipkit[ray]'`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from ..errors import BlipkitError, InputError
from ..processing import ImageProcessor
from .decode import DEFAULT_MAX_PIXELS, Decoded, Failure, decode_batch, normalise
from .engine import Step, Summary, Writer, _pending
from .readers import Item

ITEM_FIELDS = ("key", "path", "source", "offset", "size", "text", "has_text", "error", "has_error")
STEP_PREFIX = "step:"  # step columns travel under this prefix, apart from the item's own fields
WORKER_MEMORY = 320 << 20  # a decoding worker holds Python, torch and Pillow before any image (measured: 240 MB)
NO_PIXELS = np.zeros((0,), dtype=np.float32)  # the driver never sees pixels: the actors drop them


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray job runs.

    Args:
        address: a running cluster ("HOST:PORT" of its head, "ray://HOST:10001", "auto"); None starts a local Ray
            (or uses the one this process already joined).
        actors: model replicas (one actor, one model each).
        gpus_per_actor: GPUs each actor reserves (fractions share a GPU); with any, the model runs on CUDA.
        cpus_per_actor: CPUs each actor reserves (its torch threads).
        commit_rows: rows per table commit (default: the batch size); larger commits mean fewer Lance versions on
            a big cluster, and more work lost by a kill.
    """

    address: str | None = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    commit_rows: int | None = None

    def __post_init__(self) -> None:
        for name in OPTION_RULES:
            check_option(name, getattr(self, name))


OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {  # what a value must be (NaN is none of these)
    "actors": (lambda v: v >= 1, "use 1 or more"),
    "gpus_per_actor": (lambda v: v >= 0, "use 0 (CPU) or more"),
    "cpus_per_actor": (lambda v: v > 0, "use a positive number"),
    "commit_rows": (lambda v: v is None or v >= 1, "use 1 or more"),
}


def check_option(name: str, value: Any, flag: bool = False) -> None:
    """InputError naming the option (`name=value`, or `--name value` for the command line) when it is out of range."""
    ok, advice = OPTION_RULES[name]
    if not ok(value):
        raise InputError(f"--{name.replace('_', '-')} {value}: {advice}" if flag else f"{name}={value}: {advice}")


@dataclass(frozen=True)
class ModelStep:
    """A picklable recipe for a step, run in each actor: `step(model, **options)` with the model on the actor's device.

    `model` is a name or path for `blipkit.load` (loaded on the actor's node: the files must be there, or on the
    hub) or a loaded model (shipped to every actor through the object store, in its own dtype). Loaded models among
    the options (e.g. CapFilt's filter) go to the actor's device too.
    """

    step: Callable[..., Step]
    model: Any
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None

    def __call__(self) -> Step:
        import ray
        import torch

        import blipkit

        device = "cuda" if ray.get_gpu_ids() else "cpu"
        if isinstance(self.model, torch.nn.Module):
            model = self.model.to(device)  # already in its dtype
        else:
            model = blipkit.load(self.model, device=device, dtype=self.dtype)
        options = {k: v.to(device).eval() if isinstance(v, torch.nn.Module) else v for k, v in self.options.items()}
        return self.step(model.eval(), **options)


LOCAL_ONLY = {"workers": "decoding runs in Ray tasks", "commit_seconds": "commits go by RayOptions(commit_rows=...)"}


def refuse_local_options(**given: Any) -> None:
    """InputError for an option of the local executor (`workers`, `commit_seconds`) given to a Ray job."""
    for name, value in given.items():
        if value is not None:
            raise InputError(f"{name}={value} is for executor='local' (with ray, {LOCAL_ONLY[name]}): drop it")


def ray_module():
    """The `ray` package with Ray Data, imported on first use; a clear error when it is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--executor ray needs Ray Data: pip install 'blipkit[ray]'") from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse an address no Ray head answers at, in seconds (Ray itself retries for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://").rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InputError(f"--ray-address '{address}' is not HOST:PORT, ray://HOST:PORT or auto: pass the address "
                         "`ray start --head` printed")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise InputError(f"no Ray cluster answers at --ray-address '{address}' ({e.strerror or e}): start one with "
                         "`ray start --head`, pass its address, or drop --ray-address for a local Ray") from None


def connect(address: str | None):
    """Join the cluster at `address` (or start a local Ray); returns whether this call started Ray (to stop it)."""
    ray = ray_module()
    if address is not None:
        check_address(address)
    if ray.is_initialized():  # this process joined a cluster already (e.g. a notebook's `ray.init`): use it
        return False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ notices are not for users
    try:
        with warnings.catch_warnings():  # Lance warns at every fork; Ray's processes never touch a table
            warnings.filterwarnings("ignore", message=".*(lance|lancedb).*fork", category=Warning)
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
    except ConnectionError as e:
        where = f"--ray-address '{address}'" if address else "a local Ray"
        raise InputError(f"cannot join {where} ({str(e).splitlines()[0]}): check the cluster is up") from None
    return True


def _blocks(items: Iterator[Item], rows: int) -> Iterator[Any]:
    """Pending items as Arrow tables of `rows`, without nulls (whose numpy form varies): an absent offset or size is
    -1, an absent text or error "" with its `has_` flag false."""
    import pyarrow as pa

    while chunk := list(islice(items, rows)):
        yield pa.table({
            "key": [i.key for i in chunk], "path": [i.path for i in chunk], "source": [i.source for i in chunk],
            "offset": pa.array([-1 if i.offset is None else i.offset for i in chunk], pa.int64()),
            "size": pa.array([-1 if i.size is None else i.size for i in chunk], pa.int64()),
            "text": [i.text or "" for i in chunk], "has_text": [i.text is not None for i in chunk],
            "error": [i.error or "" for i in chunk], "has_error": [i.error is not None for i in chunk],
        })


def _items(batch: dict[str, np.ndarray]) -> list[Item]:
    """The items of a batch (what `_blocks` put in, back as `Item`s)."""
    b = {name: batch[name].tolist() for name in ITEM_FIELDS}
    return [Item(b["key"][i], b["path"][i], b["source"][i], None if b["offset"][i] < 0 else b["offset"][i],
                 None if b["size"][i] < 0 else b["size"][i], b["text"][i] if b["has_text"][i] else None,
                 b["error"][i] if b["has_error"][i] else None) for i in range(len(b["key"]))]


def decode_task(batch: dict[str, np.ndarray], processor: ImageProcessor, max_pixels: int) -> dict[str, np.ndarray]:
    """What a decoding task runs: the batch's items with `pixels` (the resized image, uint8: a quarter of the bytes
    of float pixels through the object store; zeros for failures), width, height, reason."""
    results = decode_batch(_items(batch), processor, max_pixels, raw=True)
    h, w = processor.size
    out = {name: batch[name] for name in ITEM_FIELDS}
    out["pixels"] = np.stack([r.pixels if isinstance(r, Decoded) else np.zeros((3, h, w), np.uint8)
                              for r in results])
    out["width"] = np.array([r.width if isinstance(r, Decoded) else -1 for r in results], dtype=np.int32)
    out["height"] = np.array([r.height if isinstance(r, Decoded) else -1 for r in results], dtype=np.int32)
    out["reason"] = np.array([r.reason if isinstance(r, Failure) else "" for r in results], dtype=object)
    return out


def decode_memory(processor: ImageProcessor, batch_size: int) -> int:
    """Memory a decoding task reserves: float-sized pixels of a batch twice (an upper bound), and the worker (bytes).

    Reserving memory also keeps Ray Data from fusing decoding into the model actors (it fuses consecutive maps whose
    resources agree): decoding stays in CPU tasks, the actors only run the model.
    """
    h, w = processor.size
    return 2 * batch_size * 3 * h * w * 4 + WORKER_MEMORY


class StepActor:
    """An actor of the pool: builds its own step once (one model per actor), then maps decoded batches to columns."""

    def __init__(self, make_step: Callable[[], Step], threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.step = make_step()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch without its pixels, with the step's columns (under `STEP_PREFIX`; failures' rows empty)."""
        ok = batch["reason"] == ""
        at = np.flatnonzero(ok)
        items = _items(batch)
        raw = [Decoded(items[i], batch["pixels"][i], int(batch["width"][i]), int(batch["height"][i])) for i in at]
        decoded = normalise(raw, self.step.processor)  # uint8 -> the processor's float pixels, exactly
        columns = self.step(decoded) if decoded else {}
        out = {name: value for name, value in batch.items() if name != "pixels"}
        for name, values in columns.items():
            out[STEP_PREFIX + name] = _full(values, at, len(ok))
        return out


def _full(values: Any, at: np.ndarray, n: int) -> np.ndarray:
    """One value per row of the batch: `values` at rows `at`, zeros (arrays) or None (objects) elsewhere."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        out = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
    else:
        values = np.array(list(values) + [None], dtype=object)[:-1]  # a 1-d object array, whatever the values
        out = np.full(n, None, dtype=object)
    out[at] = values
    return out


def _pool(ray, options: RayOptions):
    """The actor pool: `actors` at most, and from the start as many as the cluster holds now while leaving a CPU
    for decoding (a pool that takes every CPU would starve the decoding tasks); it grows when the cluster does."""
    have = ray.cluster_resources()
    fit = int((have.get("CPU", 0) - 1) // options.cpus_per_actor)
    if options.gpus_per_actor:
        fit = min(fit, int(have.get("GPU", 0) // options.gpus_per_actor))
    start = max(1, min(options.actors, fit))
    if start < options.actors:
        print(f"{options.actors} actors asked, {start} fit now ({have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} "
              "GPUs, one CPU kept for decoding): the pool grows with the cluster", file=sys.stderr)
    return ray.data.ActorPoolStrategy(min_size=start, max_size=options.actors)


def _split(batch: dict[str, np.ndarray]) -> tuple[list[Decoded], dict[str, Any], list[Failure]]:
    """A result batch as the writer takes it (items without pixels)."""
    items = _items(batch)
    ok = batch["reason"] == ""
    decoded = [Decoded(item, NO_PIXELS, int(w), int(h))
               for item, w, h, good in zip(items, batch["width"], batch["height"], ok, strict=True) if good]
    failures = [Failure(item, str(r)) for item, r, good in zip(items, batch["reason"], ok, strict=True) if not good]
    columns = {name[len(STEP_PREFIX):]: values[ok] for name, values in batch.items() if name.startswith(STEP_PREFIX)}
    return decoded, columns, failures


def _cause(e: BaseException) -> BlipkitError | None:
    """A BlipkitError raised in a task or actor, unwrapped from Ray's exceptions."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, BlipkitError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def run_job_ray(
    items: Iterable[Item],
    make_step: Callable[[], Step],
    writer: Writer,
    processor: ImageProcessor,
    batch_size: int = 32,
    options: RayOptions | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    desc: str = "images",
) -> Summary:
    """Run a job over `items` on Ray Data (see the module docstring); returns its Summary, as `run_job` does.

    Args:
        make_step: builds the step in each actor (picklable; e.g. a `ModelStep`).
        processor: the step's image processor (what decoding tasks preprocess with).
        batch_size: images per decoding task and per model call.
    """
    from tqdm import tqdm

    options = options or RayOptions()
    if batch_size < 1:
        raise InputError(f"batch size {batch_size}: use 1 or more")
    start = time.perf_counter()
    summary = Summary()
    total = items.count() if progress and hasattr(items, "count") else None
    started = connect(options.address)
    ray = ray_module()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.print_on_execution_start = ctx.enable_auto_log_stats = False
        pool = _pool(ray, options)
        with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not progress, smoothing=0.1) as bar:
            refs = [ray.put(b) for b in _blocks(_pending(items, writer, summary, bar), batch_size)]
            if refs:
                ds = (ray.data.from_arrow_refs(refs)
                      .map_batches(decode_task, batch_size=batch_size, batch_format="numpy",
                                   fn_args=(processor, max_pixels), num_cpus=1,
                                   memory=decode_memory(processor, batch_size))
                      .map_batches(StepActor, batch_size=batch_size, batch_format="numpy",
                                   fn_constructor_args=(make_step, int(options.cpus_per_actor)),
                                   compute=pool,
                                   num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None))
                try:
                    for batch in ds.iter_batches(batch_size=options.commit_rows or batch_size, batch_format="numpy"):
                        ok, columns, failures = _split(batch)
                        writer.write(ok, columns, failures)
                        summary.added += len(ok)
                        summary.failed += len(failures)
                        bar.update(len(ok) + len(failures))
                        bar.set_postfix(added=summary.added, skipped=summary.skipped, failed=summary.failed,
                                        refresh=False)
                except Exception as e:
                    cause = _cause(e)
                    if cause is None:
                        raise
                    raise cause from None
    finally:
        if started:
            ray.shutdown()
    summary.extra = writer.finish()
    summary.seconds = time.perf_counter() - start
    return summary
