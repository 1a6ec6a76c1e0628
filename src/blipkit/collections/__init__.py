"""Bulk jobs over image collections and the persistent LanceDB index with two-stage search.

A job is a reader (`readers.read_sources`: items with stable keys), a batched step (`steps.EmbedStep`,
`caption.CaptionStep`: decoded images -> columns) and a writer (`store.TableWriter`, and in `writers` caption
sidecars, JSON lines, Parquet: atomic batch commits, resume by keys or outputs), driven by `engine.run_job` (decoding
in worker processes, progress on stderr). `Index` and `caption_images` put them together; see docs/collections.md.
LanceDB is imported only when a table is opened (`pip install 'blipkit[index]'`); the model side (`Index`,
`EmbedStep`, `CaptionStep`, `caption_images`) is imported on first use, so decoding workers start light.
"""

from .decode import Decoded, Failure, decode, decode_batch
from .engine import Step, Summary, Writer, pixels, run_job
from .readers import Item, Sources, file_item, read_sources

__all__ = ["CaptionStep", "Decoded", "EmbedStep", "Failure", "Index", "Item", "Sources", "Step", "Summary", "Writer",
           "caption_images", "decode", "decode_batch", "file_item", "pixels", "read_sources", "run_job"]


def __getattr__(name: str):
    if name == "Index":
        from .index import Index

        return Index
    if name == "EmbedStep":
        from .steps import EmbedStep

        return EmbedStep
    if name in ("CaptionStep", "caption_images"):
        from . import caption

        return getattr(caption, name)
    raise AttributeError(f"module 'blipkit.collections' has no attribute '{name}'")
