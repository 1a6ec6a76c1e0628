"""Bulk jobs over image collections and the persistent LanceDB index with two-stage search.

A job is a reader (`readers.read_sources`: items with stable keys), a batched step (`steps.EmbedStep`: decoded images
-> columns) and a writer (`store.TableWriter`: atomic batch commits, resume by keys), driven by `engine.run_job`
(decoding in worker processes, progress on stderr). `Index` puts them together; see docs/collections.md.
LanceDB is imported only when a table is opened (`pip install 'blipkit[index]'`); the model side (`Index`,
`EmbedStep`) is imported on first use, so decoding workers start light.
"""

from .decode import Decoded, Failure, decode, decode_batch
from .engine import Step, Summary, Writer, pixels, run_job
from .readers import Item, Sources, file_item, read_sources

__all__ = ["Decoded", "EmbedStep", "Failure", "Index", "Item", "Sources", "Step", "Summary", "Writer", "decode",
           "decode_batch", "file_item", "pixels", "read_sources", "run_job"]


def __getattr__(name: str):
    if name == "Index":
        from .index import Index

        return Index
    if name == "EmbedStep":
        from .steps import EmbedStep

        return EmbedStep
    raise AttributeError(f"module 'blipkit.collections' has no attribute '{name}'")
