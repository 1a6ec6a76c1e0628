"""Bulk captioning on the job engine: `CaptionStep` (decoded images -> captions) and `caption_images`, which runs it
from any reader into caption sidecar files, a JSON-lines file, a Parquet file or a LanceDB table.

    from blipkit.collections import caption_images
    caption_images("photos/", "scenes-blip", write="sidecar", recursive=True, num_beams=3)  # photo.jpg -> photo.txt
    caption_images("photos/", "scenes-blip", write="jsonl", out="captions.jsonl", do_sample=True, seed=1)

Beam search and greedy decoding run a whole batch at once and give the captions one image at a time gives (the
model's decoding keeps each row to itself; tested with beams, several captions and prompts of unequal length). Nucleus
sampling draws each image's tokens from its own generator (`caption(generator=[...])`), seeded by `seed` and the
item's key: a caption does not depend on the batch it fell in, the order, or a resume; the batch decodes at once.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..base import BlipBase, check_prompts
from ..errors import InputError
from ..generate import caption_config
from .decode import DEFAULT_MAX_PIXELS, Decoded
from .engine import COMMIT_SECONDS, Summary, pixels, run_job
from .readers import read_sources
from .steps import fingerprint

if TYPE_CHECKING:
    from .ray_executor import RayOptions

WRITES = ("sidecar", "jsonl", "parquet", "table")
#: keyword options of `model.caption` a caption job passes on (None: the model's default)
OPTIONS = ("prompt", "num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "do_sample",
           "temperature", "top_p", "num_captions", "length_penalty")


def item_seed(seed: int, key: str) -> int:
    """The seed of one item's sampled caption: a hash of the job's seed and the item's key."""
    digest = hashlib.blake2b(f"{seed}|{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class CaptionStep:
    """Maps a batch of decoded images to `caption` (prefix + the model's caption + suffix) and, with
    `num_captions > 1`, `captions` (all of them, best first; `caption` is the first).

    Args:
        model: a model that captions (BLIP captioning, BLIP-2 with a language model).
        prefix, suffix: text put before / after every caption as it is (e.g. "photo of sks, ").
        seed: with `do_sample=True`, the seed each image's own generator is derived from (with its key).
        options: `model.caption` keyword options (see `OPTIONS`); those not given are the model's defaults.
    """

    def __init__(self, model: BlipBase, prefix: str = "", suffix: str = "", seed: int = 0, **options: Any) -> None:
        model.require("caption")
        unknown = [k for k in options if k not in OPTIONS]
        if unknown:
            raise InputError(f"caption option {unknown[0]!r} is not one of {', '.join(OPTIONS)}")
        for name, value in (("prefix", prefix), ("suffix", suffix)):
            if not isinstance(value, str) or "\0" in value:
                raise InputError(f"{name} {value!r}: give a text (it is written as it is)")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InputError(f"seed {seed!r}: give a whole number from 0 to 2**63 - 1")
        defaults = {k: p.default for k, p in inspect.signature(model.caption).parameters.items() if k in OPTIONS}
        self.options = {**defaults, **{k: v for k, v in options.items() if v is not None}}
        o = self.options
        # checked once here, so a bad option fails before any image is read
        caption_config(o["num_beams"], o["max_new_tokens"], o["min_new_tokens"], o["repetition_penalty"],
                       o["do_sample"], o["temperature"], o["top_p"], o["num_captions"], o["length_penalty"], False)
        if isinstance(o["prompt"], (list, tuple)):
            raise InputError("a caption job takes one prompt for every image (a string), not a list")
        check_prompts(o["prompt"])
        self.model, self.processor = model, model.processor
        self.prefix, self.suffix, self.seed = prefix, suffix, seed

    @property
    def num_captions(self) -> int:
        """Captions per image."""
        return int(self.options["num_captions"])

    def settings(self) -> dict[str, Any]:
        """What a table of captions records: the model, its fingerprint and everything that decides the captions."""
        m = self.model
        return {"task": "caption", "model": m.name_or_path, "fingerprint": fingerprint(m), "family": m.family,
                "options": dict(self.options), "seed": self.seed, "prefix": self.prefix, "suffix": self.suffix,
                "captions": self.num_captions}

    def columns(self) -> dict[str, Any]:
        """The columns' Arrow types."""
        import pyarrow as pa

        out = {"caption": pa.string()}
        if self.num_captions > 1:
            out["captions"] = pa.list_(pa.string())
        return out

    @torch.no_grad()
    def __call__(self, batch: list[Decoded]) -> dict[str, Any]:
        """Captions of the decoded images of one batch."""
        m = self.model
        x = pixels(batch).to(m.device, m.dtype)
        if not self.options["do_sample"]:
            raw = m.caption(x, **self.options)
        else:  # the batch at once, each image drawing from its own generator
            gens = [torch.Generator(m.device).manual_seed(item_seed(self.seed, d.item.key)) for d in batch]
            raw = m.caption(x, generator=gens, **self.options)
        every = [[c] if isinstance(c, str) else list(c) for c in raw]
        every = [[self.prefix + c + self.suffix for c in cs] for cs in every]
        out: dict[str, Any] = {"caption": [cs[0] for cs in every]}
        if self.num_captions > 1:
            out["captions"] = every
        return out


def caption_images(
    sources: str | Path | Iterable[str | Path],
    model: BlipBase | str = "scenes-blip",
    write: str = "sidecar",
    out: str | Path | None = None,
    table: str = "captions",
    ext: str = ".txt",
    overwrite: bool = False,
    prefix: str = "",
    suffix: str = "",
    seed: int = 0,
    recursive: bool = False,
    batch_size: int = 8,
    workers: int | None = None,
    progress: bool = False,
    executor: str = "local",
    ray: RayOptions | None = None,
    errors: str | Path | None = None,
    path_column: str | None = None,
    text_column: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: str | None = None,
    dtype: str | None = None,
    commit_seconds: float | None = None,
    **options: Any,
) -> Summary:
    """Caption the images of `sources` into `write`; resumable (a rerun skips what is done), bad files recorded.

    Args:
        sources: files, folders, globs, path lists, tables with a path column, `.tar` shards, blipkit tables.
        model: a loaded model or a name for `blipkit.load`.
        write: "sidecar" (a caption file next to each image: IMAGE + `ext`; the files are the resume state),
            "jsonl" or "parquet" (`out` is the file), "table" (`out` is the LanceDB directory, `table` the table).
        overwrite: caption every image again and replace its result (default: skip the done ones).
        prefix, suffix: text put around every caption. seed: of sampled captions (with `do_sample=True`).
        errors: sidecar only: a JSON-lines file the failures are appended to (they are counted either way).
        executor: "local", or "ray": the same job on Ray Data (`ray`: address, actors, GPUs; see `ray_executor`).
        commit_seconds: locally, results are written at least this far apart (default 1 s; 0: every batch; see
            `engine.run_job`); with ray, commits go by `ray.commit_rows`.
        options: `model.caption` options: prompt, num_beams, max_new_tokens, min_new_tokens, do_sample,
            temperature, top_p, num_captions, repetition_penalty, length_penalty.

    Returns:
        The job's Summary (added, skipped, failed, and the writer's fields: files written, rows, output).
    """
    if executor not in ("local", "ray"):
        raise InputError(f"executor={executor!r}: use local or ray")
    if executor == "ray":
        from .ray_executor import refuse_local_options

        refuse_local_options(commit_seconds=commit_seconds)
    check_job(sources, write, out, ext, errors, recursive, path_column, text_column)
    items = read_sources(sources, recursive, path_column, text_column)
    spec = model  # a name is loaded by each Ray actor on its own node
    if isinstance(model, str):
        import blipkit

        model = blipkit.load(model, device=device, dtype=dtype)
    elif not isinstance(model, BlipBase):
        raise InputError(f"model is a {type(model).__name__}: pass a loaded blipkit model or a model name")
    step = CaptionStep(model, prefix=prefix, suffix=suffix, seed=seed, **options)
    writer = make_writer(write, step, out, table, ext, overwrite, errors)
    if write == "sidecar":
        items = writer.items(items)  # tar members and shared caption files refused before any decode
    if executor == "ray":
        from .ray_executor import ModelStep, run_job_ray

        recipe = ModelStep(CaptionStep, spec, dict(prefix=prefix, suffix=suffix, seed=seed, **options), dtype)
        return run_job_ray(items, recipe, writer, step.processor, batch_size, ray, max_pixels, progress,
                           desc=f"caption -> {write}")
    return run_job(items, step, writer, batch_size, workers, max_pixels, progress, desc=f"caption -> {write}",
                   commit_seconds=COMMIT_SECONDS if commit_seconds is None else commit_seconds)


def check_job(sources: str | Path | Iterable[str | Path], write: str, out: str | Path | None = None,
              ext: str = ".txt", errors: str | Path | None = None, recursive: bool = False,
              path_column: str | None = None, text_column: str | None = None) -> None:
    """Check a caption job's output and sources before any model is loaded; InputError naming what is wrong."""
    from . import store, writers

    if write not in WRITES:
        raise InputError(f"write={write!r}: use one of {', '.join(WRITES)}")
    if write == "sidecar":
        if out is not None:
            raise InputError("--write sidecar puts each caption next to its image: drop --out (or use --write jsonl)")
        writers.check_ext(ext)
        if errors is not None:
            writers.check_output_file(errors, (".jsonl", ".ndjson"), "JSON-lines errors")
    else:
        if out is None:
            raise InputError(f"--write {write} needs --{'db' if write == 'table' else 'out'}: where the results go")
        if errors is not None:
            raise InputError(f"--errors is for --write sidecar; --write {write} records failures in its output")
        if write == "table":
            store.connect(out, write=True)
        else:
            writers.check_output_file(out, (".parquet",) if write == "parquet" else (".jsonl", ".ndjson"), write)
    items = read_sources(sources, recursive, path_column, text_column)
    if next(iter(items), None) is None:
        raise InputError(f"sources {' '.join(map(str, items.specs))} hold no images"
                         + ("" if recursive else " (pass recursive=True / --recursive for subfolders)"))


def make_writer(write: str, step: CaptionStep, out: str | Path | None = None, table: str = "captions",
                ext: str = ".txt", overwrite: bool = False, errors: str | Path | None = None):
    """The writer of a caption job (see `writers` and `store.TableWriter`)."""
    from . import store, writers

    if write == "sidecar":
        return writers.SidecarWriter(ext, overwrite, errors)
    if write == "jsonl":
        return writers.JsonlWriter(out, overwrite)
    if write == "parquet":
        return writers.ParquetWriter(out, step.columns(), overwrite)
    return store.TableWriter(out, table, step.settings(), ann="none", overwrite=overwrite)
