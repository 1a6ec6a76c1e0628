"""Readers: what a bulk job goes over, as a stream of `Item`s with stable keys, never held in memory at once.

A source is named by a string (what the command line takes) and read by `read_sources`:
- an image file (any suffix: a file that is not an image becomes an error record, not a crash);
- a folder: its image files, sorted (`recursive=True`: the whole tree, each folder sorted);
- a glob pattern (`photos/**/*.jpg`): its matches, sorted (image files and `.tar` shards);
- a text file of paths (`.txt`, `.lst`): one path a line, relative ones to the file's folder;
- a table with a path column (`.parquet`, `.csv`, `.jsonl` / `.ndjson`), relative paths to the table's folder, and
  an optional text column carried through as the item's `text` (e.g. a caption that came with the image);
- a webdataset shard (`.tar`, uncompressed): one item per sample with an image member (`KEY.jpg|png|webp|...`) and
  its `KEY.txt` as text; the worker reads the member's bytes straight from their offset in the shard;
- an existing blipkit table (a `NAME.lance` directory): its `path` column (and `text`, when present).

Keys. A file's key is `ABSOLUTE_PATH|SIZE|MTIME_NS` (from one `stat`, so a rerun reads no file); a tar member's is
`SHARD/MEMBER|SIZE|MTIME` from its tar header. Editing a file changes its key (it is indexed again); moving the
collection changes every key. Content hashes would survive a move but cost a full read of every file on each rerun.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..tasks.inputs import IMAGE_SUFFIXES

LIST_SUFFIXES = (".txt", ".lst")
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")
PATH_COLUMNS = ("path", "image", "file_name", "filepath", "file")  # tried in this order when none is given
TEXT_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class Item:
    """One image to process: its stable key, the path shown and stored, and where its bytes are.

    `offset`/`size` locate a tar member's bytes inside the shard `source`; for plain files `source` is the path and
    `offset` is None. `error` is set when the reader already knows the item is bad (e.g. the file cannot be stat'ed).
    """

    key: str
    path: str
    source: str
    offset: int | None = None
    size: int | None = None
    text: str | None = None
    error: str | None = None

    def read_bytes(self) -> bytes:
        """The item's encoded image bytes (the whole file, or the tar member's range)."""
        with open(self.source, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def file_item(path: str | Path, text: str | None = None) -> Item:
    """The item of one file, keyed by absolute path, size and modification time."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError as e:
        return Item(f"{path}|missing", path, path, text=text, error=f"cannot stat the file ({e.strerror or e})")
    return Item(f"{path}|{st.st_size}|{st.st_mtime_ns}", path, path, text=text)


def file_of_key(key: str) -> str:
    """The path a file's key starts with (`ABSOLUTE_PATH|SIZE|MTIME_NS`; other keys give a path that is no file)."""
    return key.rsplit("|", 2)[0]


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _walk(folder: str, recursive: bool) -> Iterator[str]:
    """Image files of a folder in sorted order, subfolders (when recursive) in place; symlinked folders not followed."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise InputError(f"cannot list folder '{folder}' ({e.strerror or e}): check its permissions") from None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                yield from _walk(entry.path, recursive)
        elif _is_image_name(entry.name):
            yield entry.path


def _column(names: list[str], given: str | None, defaults: tuple[str, ...], source: str, what: str) -> str | None:
    """The column to read: `given` (must exist) or the first default present (None when optional and absent)."""
    if given is not None:
        if given not in names:
            raise InputError(f"{source} has no column '{given}' (it has: {', '.join(names)}); pass the right "
                             f"--{what}-column")
        return given
    found = next((c for c in defaults if c in names), None)
    if found is None and what == "path":
        raise InputError(f"{source} has no path column (looked for {', '.join(defaults)}; it has: {', '.join(names)});"
                         " pass --path-column")
    return found


def _rows(source: str, path_column: str | None, text_column: str | None) -> Iterator[tuple[object, object]]:
    """(path, text) pairs of a Parquet, CSV or JSON-lines table, streamed batch by batch."""
    suffix = os.path.splitext(source)[1].lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise InputError(f"{source} line {n} is not valid JSON: fix or remove it") from None
                if not isinstance(row, dict):
                    raise InputError(f"{source} line {n} is not a JSON object with a path field")
                pc = _column(list(row), path_column, PATH_COLUMNS, f"{source} line {n}", "path")
                tc = _column(list(row), text_column, TEXT_COLUMNS, f"{source} line {n}", "text")
                yield row.get(pc), row.get(tc) if tc else None
        return
    if suffix == ".csv":
        with open(source, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            names = list(reader.fieldnames or [])
            pc = _column(names, path_column, PATH_COLUMNS, source, "path")
            tc = _column(names, text_column, TEXT_COLUMNS, source, "text")
            for row in reader:
                yield row.get(pc), row.get(tc) if tc else None
        return
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"cannot read Parquet file '{source}' ({e}): pass a Parquet table") from None
    names = pf.schema_arrow.names
    pc = _column(names, path_column, PATH_COLUMNS, source, "path")
    tc = _column(names, text_column, TEXT_COLUMNS, source, "text")
    for batch in pf.iter_batches(columns=[c for c in (pc, tc) if c], batch_size=4096):
        paths = batch.column(pc).to_pylist()
        texts = batch.column(tc).to_pylist() if tc else [None] * len(paths)
        yield from zip(paths, texts, strict=True)


def _table_items(source: str, path_column: str | None, text_column: str | None) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(source))
    for n, (path, text) in enumerate(_rows(source, path_column, text_column), 1):
        if not isinstance(path, str) or not path.strip():
            raise InputError(f"{source} row {n}: the path is {path!r}; every row needs an image path")
        yield file_item(os.path.join(base, os.path.expanduser(path)), text if isinstance(text, str) else None)


def _list_items(source: str) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(source))
    try:
        with open(source, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield file_item(os.path.join(base, os.path.expanduser(line.strip())))
    except UnicodeDecodeError as e:
        raise InputError(f"list file '{source}' is not UTF-8 text ({e}): give one path a line") from None


def _tar_items(shard: str) -> Iterator[Item]:
    """One item per sample of an uncompressed webdataset shard; headers only are read (random access)."""
    shard = os.path.abspath(shard)
    try:
        tar = tarfile.open(shard, "r:")
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"cannot read tar shard '{shard}' ({e}): pass an uncompressed .tar (webdataset)") from None
    with tar:
        sample, image, text = None, None, None

        def finish() -> Iterator[Item]:
            if image is not None:
                yield Item(f"{shard}/{image.name}|{image.size}|{int(image.mtime)}", f"{shard}/{image.name}", shard,
                           image.offset_data, image.size, text)

        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            key = os.path.join(folder, base.split(".", 1)[0])
            if key != sample:
                yield from finish()
                sample, image, text = key, None, None
            if _is_image_name(member.name) and image is None:
                image = member
            elif base.endswith(".txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace").strip() or None
        yield from finish()


def _lance_items(source: str) -> Iterator[Item]:
    from .store import lance_module

    try:
        ds = lance_module().dataset(source)
    except Exception as e:  # lance raises its own error types for a directory that is not a table
        raise InputError(f"cannot open table '{source}' ({e}): pass a NAME.lance directory blipkit wrote") from None
    names = ds.schema.names
    if "path" not in names:
        raise InputError(f"table '{source}' has no 'path' column: it is not a blipkit image table")
    columns = ["path"] + (["text"] if "text" in names else [])
    shard, members = None, {}  # the headers of the last shard met: rows of one shard come together
    for batch in ds.to_batches(columns=columns, batch_size=4096):
        paths = batch.column("path").to_pylist()
        texts = batch.column("text").to_pylist() if "text" in columns else [None] * len(paths)
        for path, text in zip(paths, texts, strict=True):
            if ".tar/" not in path or os.path.exists(path):
                yield file_item(path, text)
                continue
            if not path.startswith(f"{shard}/"):
                shard = path.rpartition(".tar/")[0] + ".tar"
                members = {it.path: it for it in _tar_items(shard)} if os.path.isfile(shard) else {}
            yield members.get(path) or Item(f"{path}|missing", path, shard, error="the tar shard or member is gone")


def item_of_path(path: str) -> Item:
    """The item of a stored path: a file, or a `SHARD.tar/MEMBER` tar member (found through the shard's headers)."""
    if ".tar/" in path and not os.path.exists(path):
        shard = path.rpartition(".tar/")[0] + ".tar"
        found = next((it for it in _tar_items(shard) if it.path == path), None) if os.path.isfile(shard) else None
        return found or Item(f"{path}|missing", path, shard, error="the tar shard or its member is gone")
    return file_item(path)


def _kind(spec: str) -> str:
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        return "lance" if suffix == ".lance" else "folder"
    if path.is_file():
        if suffix == ".tar":
            return "tar"
        if suffix in LIST_SUFFIXES:
            return "list"
        if suffix in TABLE_SUFFIXES:
            return "table"
        return "file"
    if glob.has_magic(spec):
        return "glob"
    raise InputError(f"source '{spec}' does not exist: check the path")


def _source_items(spec: str, recursive: bool, path_column: str | None, text_column: str | None) -> Iterator[Item]:
    kind = _kind(spec)
    path = os.path.expanduser(spec)
    if kind == "folder":
        yield from (file_item(p) for p in _walk(path, recursive))
    elif kind == "glob":
        for match in sorted(glob.glob(path, recursive=True)):
            if match.lower().endswith(".tar") and os.path.isfile(match):
                yield from _tar_items(match)
            elif _is_image_name(match) and os.path.isfile(match):
                yield file_item(match)
    elif kind == "list":
        yield from _list_items(path)
    elif kind == "table":
        yield from _table_items(path, path_column, text_column)
    elif kind == "tar":
        yield from _tar_items(path)
    elif kind == "lance":
        yield from _lance_items(path)
    else:
        yield file_item(path)


@dataclass
class Sources:
    """The items of one or more sources: iterable any number of times (each pass re-reads the sources)."""

    specs: list[str]
    recursive: bool = False
    path_column: str | None = None
    text_column: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.specs, (str, Path)):
            self.specs = [self.specs]
        self.specs = [os.fspath(s) for s in self.specs]
        if not self.specs:
            raise InputError("no sources given: pass image files, folders, globs, path lists, tables or tar shards")
        for spec in self.specs:
            _kind(spec)  # a missing source is an error before any work starts

    def __iter__(self) -> Iterator[Item]:
        for spec in self.specs:
            yield from _source_items(spec, self.recursive, self.path_column, self.text_column)

    def count(self) -> int:
        """How many items the sources hold (one pass over names and headers; no image is read)."""
        return sum(1 for _ in self)


def read_sources(
    specs: str | Path | Iterable[str | Path],
    recursive: bool = False,
    path_column: str | None = None,
    text_column: str | None = None,
) -> Sources:
    """The items named by `specs` (see the module docstring for what a source can be)."""
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    return Sources(specs, recursive, path_column, text_column)
