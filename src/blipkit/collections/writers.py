"""File writers of bulk jobs: caption sidecar files, a JSON-lines file, a Parquet file (the LanceDB one is in `store`).

Each is a `Writer` (see `engine`): `done(keys)` is what an earlier run already wrote, `write(batch, columns,
failures)` commits one batch so that a `kill -9` loses at most the batch in flight, `finish()` tidies up.

- `SidecarWriter`: `IMAGE.png` -> `IMAGE.txt` (`ext`), each file written to a temporary name and renamed into place,
  so a caption file is whole or absent. The files are the resume state: an image whose caption file exists is done
  (unless `overwrite`). So are failures: a bad image gets a hidden marker next to it, `.IMAGE.png.caption-error`
  (JSON: its key and the reason), and a rerun skips it while its key (path, size, mtime) is the same; an image
  edited since is tried again, and its marker goes once it is captioned. Failures are kept for the summary and,
  with `errors=FILE`, appended there as JSON lines.
- `JsonlWriter`: one JSON object a line, `{"key", "path", "width", "height", "text", <columns>}` or
  `{"key", "path", "error"}`; a batch is one `write` + fsync. A torn last line (a kill inside the write) is cut off
  when the file is opened again; keys of the lines there are done.
- `ParquetWriter`: each batch is a part file in `FILE.parts/` (written, then renamed); `finish` merges the file and
  its parts into a new `FILE` (renamed into place) and removes the parts. Keys of the file and of the parts are done.

JSON lines and Parquet keep one row per path, the last written: a file edited since (a new key) or redone with
`overwrite` replaces its row when the job finishes. Error rows are final for their key, as in the LanceDB table.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..tasks.inputs import IMAGE_SUFFIXES
from .decode import Decoded, Failure
from .engine import key_hash
from .readers import Item, file_of_key

FAILURES_KEPT = 1000  # failures a sidecar job lists in its summary (all go to the errors file)
ERROR_SUFFIX = ".caption-error"  # the marker of an image a sidecar job could not caption (see `error_marker`)


def _hash_array(keys: Iterable[str]) -> np.ndarray:
    return np.fromiter((key_hash(k) for k in keys), dtype=np.int64)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling and a rename: the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _row(d: Decoded, columns: dict[str, Any], i: int) -> dict[str, Any]:
    """The output row of the i-th decoded item: its fields, then the step's columns (as plain Python values)."""
    row: dict[str, Any] = {"key": d.item.key, "path": d.item.path, "width": d.width, "height": d.height,
                           "text": d.item.text}
    for name, values in columns.items():
        value = values[i]
        row[name] = value.tolist() if isinstance(value, np.ndarray) else value
    return row


def _error_row(f: Failure) -> dict[str, Any]:
    return {"key": f.item.key, "path": f.item.path, "error": f.reason}


def _json_line(row: dict[str, Any]) -> bytes:
    """One JSON line; lone surrogates (non-UTF-8 file names) become escapes that JSON reads back as the same text."""
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def keep_last(paths: np.ndarray) -> np.ndarray:
    """Mask of the rows to keep when each path (as a hash) keeps only its last row."""
    if len(paths) == 0:
        return np.zeros(0, dtype=bool)
    _, first_from_end = np.unique(paths[::-1], return_index=True)
    keep = np.zeros(len(paths), dtype=bool)
    keep[len(paths) - 1 - first_from_end] = True
    return keep


# ------------------------------------------------------------------------------------------------- sidecar files


def check_ext(ext: str) -> str:
    """A sidecar suffix such as ".txt" or ".caption", checked: it must not name an image (that would overwrite it)."""
    if not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2 or any(c in ext for c in "/\\\0") \
            or ext.strip() != ext:
        raise InputError(f"--ext {ext!r}: give a file suffix starting with a dot, such as .txt or .caption")
    if ext.lower() in IMAGE_SUFFIXES:
        raise InputError(f"--ext {ext}: that is an image suffix, and caption files would overwrite images; use .txt")
    return ext


def sidecar_path(item: Item, ext: str) -> Path:
    """Where an image's caption file goes: the image's path with its suffix replaced by `ext`."""
    return Path(os.path.splitext(item.path)[0] + ext)


def error_marker(path: str) -> Path:
    """The hidden file next to an image that records why it failed: `.NAME.caption-error`."""
    image = Path(path)
    return image.with_name(f".{image.name}{ERROR_SUFFIX}")


def _known_failure(key: str) -> bool:
    """Whether the image of `key` failed before as it is now (its marker holds this very key)."""
    try:
        return json.loads(error_marker(file_of_key(key)).read_text("utf-8"))["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


class SidecarItems:
    """The items of a reader, with those that cannot have a caption file of their own marked as errors.

    A tar member has no folder to write into; two images of one folder with the same stem (`a.png`, `a.jpg`)
    would share `a.txt`, so the second is refused. Iterable again and again, and counted, as the reader is.
    """

    def __init__(self, items: Iterable[Item], ext: str, refused: set[int] | None = None) -> None:
        self.items, self.ext = items, ext
        self.refused = refused if refused is not None else set()  # key hashes of the items marked here

    def __iter__(self) -> Iterator[Item]:
        owners: dict[int, str] = {}
        for item in self.items:
            if item.error is None and item.offset is not None:
                item = _failed(item, "a tar member has no folder for a caption file: use --write jsonl, parquet "
                                     "or table for tar shards")
            elif item.error is None:
                side = sidecar_path(item, self.ext)
                h = key_hash(str(side))
                owner = owners.setdefault(h, item.path)
                if owner != item.path:
                    item = _failed(item, f"its caption file {side.name} is also {Path(owner).name}'s: rename one "
                                         "of them or use --write jsonl")
            if item.error is not None:
                self.refused.add(key_hash(item.key))
            yield item

    def count(self) -> int:
        """How many items the reader holds."""
        return self.items.count() if hasattr(self.items, "count") else sum(1 for _ in self.items)


def _failed(item: Item, reason: str) -> Item:
    from dataclasses import replace

    return replace(item, error=reason)


class SidecarWriter:
    """Each image's caption (with several: one a line) in a text file next to it; see the module docstring."""

    def __init__(self, ext: str = ".txt", overwrite: bool = False, errors: str | Path | None = None,
                 text: Callable[[dict[str, Any]], str] | None = None) -> None:
        self.ext, self.overwrite = check_ext(ext), overwrite
        self.errors = Path(errors).expanduser() if errors is not None else None
        self.text = text or _caption_text
        self.written, self.failures, self.failed = 0, [], 0
        self.refused: set[int] = set()

    def items(self, items: Iterable[Item]) -> SidecarItems:
        """The reader's items as this writer takes them (see `SidecarItems`): pass these to the driver."""
        return SidecarItems(items, self.ext, self.refused)

    def done(self, keys: list[str]) -> list[bool]:
        """Whether each image has its caption file already, or failed before unchanged (never, with overwrite).

        A file's key starts with its absolute path (see `readers`). Items `items()` refused (tar members, a caption
        file two images would share) are never done: they fail again, before any decode.
        """
        if self.overwrite:
            return [False] * len(keys)
        return [key_hash(k) not in self.refused and (Path(os.path.splitext(file_of_key(k))[0] + self.ext).is_file()
                                                     or _known_failure(k)) for k in keys]

    def write(self, batch: list[Decoded], columns: dict[str, Any], failures: list[Failure]) -> None:
        """Write each caption file (atomically), and record the failures."""
        for i, d in enumerate(batch):
            path = sidecar_path(d.item, self.ext)
            try:
                _atomic_write(path, (self.text(_row(d, columns, i)) + "\n").encode("utf-8"))
            except OSError as e:
                raise InputError(f"cannot write caption file '{path}' ({e.strerror or e}): make the folder writable "
                                 "or use --write jsonl / parquet / table") from None
            error_marker(d.item.path).unlink(missing_ok=True)  # failed before, edited since: no longer bad
            self.written += 1
        for f in failures:  # remembered next to the image (refused items fail again without a decode)
            if key_hash(f.item.key) not in self.refused and os.path.isfile(f.item.path):
                marker = error_marker(f.item.path)
                try:
                    _atomic_write(marker, _json_line({"key": f.item.key, "reason": f.reason}))
                except OSError as e:
                    raise InputError(f"cannot write error marker '{marker}' ({e.strerror or e}): make the folder "
                                     "writable or use --write jsonl / parquet / table") from None
        if failures:
            self.failed += len(failures)
            self.failures += [{"path": f.item.path, "reason": f.reason}
                              for f in failures[: max(0, FAILURES_KEPT - len(self.failures))]]
            if self.errors is not None:
                with open(self.errors, "ab") as f:
                    f.write(b"".join(_json_line(_error_row(x)) for x in failures))
                    f.flush()
                    os.fsync(f.fileno())

    def finish(self) -> dict[str, Any]:
        """Summary fields: files written, the failures (the first FAILURES_KEPT) and the errors file."""
        out: dict[str, Any] = {"written": self.written, "failures": self.failures}
        if self.errors is not None:
            out["errors_file"] = str(self.errors)
        return out


def _caption_text(row: dict[str, Any]) -> str:
    """A caption file's text: every caption, one a line (one caption: just it)."""
    return "\n".join(row["captions"]) if row.get("captions") else row["caption"]


# ------------------------------------------------------------------------------------------------- JSON lines


def check_output_file(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    """An output file, checked before any work: its folder exists and is writable, it is not a folder."""
    out = Path(path).expanduser()
    if out.suffix.lower() not in suffixes:
        raise InputError(f"--out '{path}': a {what} file needs a name ending in {' or '.join(suffixes)}")
    if out.is_dir():
        raise InputError(f"--out '{path}' is a folder: give a {what} file path")
    if not out.parent.is_dir():
        raise InputError(f"--out '{path}': the folder '{out.parent}' does not exist (create it first)")
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"--out '{path}': cannot write there (no permission); choose another path")
    return out


class _KeyedFile:
    """What the file writers share: the sorted key hashes of what the output holds, and `done` by them."""

    keys: np.ndarray
    overwrite: bool

    def done(self, keys: list[str]) -> list[bool]:
        """Whether each key is in the output already (never, with overwrite)."""
        if self.overwrite or len(self.keys) == 0:
            return [False] * len(keys)
        h = _hash_array(keys)
        at = np.searchsorted(self.keys, h).clip(max=len(self.keys) - 1)
        return (self.keys[at] == h).tolist()


class JsonlWriter(_KeyedFile):
    """Results as JSON lines appended to `path`; see the module docstring."""

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path, self.overwrite = check_output_file(path, (".jsonl", ".ndjson"), "JSON-lines"), overwrite
        keys = []
        if self.path.exists():
            self._cut_torn_line()
            keys = [row["key"] for row in self._read()]
        self.keys = np.sort(_hash_array(keys))

    def _cut_torn_line(self) -> None:
        """Remove a last line without its newline: what a kill inside a write leaves."""
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            end = size
            while end > 0:  # back to the last newline, a block at a time
                start = max(0, end - 65536)
                f.seek(start)
                at = f.read(end - start).rfind(b"\n")
                if at >= 0:
                    f.truncate(start + at + 1)
                    return
                end = start
            f.truncate(0)

    def _read(self) -> Iterator[dict[str, Any]]:
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise InputError(f"--out '{self.path}' line {n} is not JSON: fix or remove it, or choose "
                                         "another file") from None
                    if not isinstance(row, dict) or "key" not in row or "path" not in row:
                        raise InputError(f"--out '{self.path}' line {n} has no key and path: it is not a file this "
                                         "command wrote; choose another file")
                    yield row

    def write(self, batch: list[Decoded], columns: dict[str, Any], failures: list[Failure]) -> None:
        """Append the batch's lines in one write, flushed to disk."""
        data = b"".join(_json_line(_row(d, columns, i)) for i, d in enumerate(batch))
        data += b"".join(_json_line(_error_row(f)) for f in failures)
        if not data:
            return
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> dict[str, Any]:
        """Keep one line per path (the last), when a path has several; the file's counts for the summary."""
        if not self.path.exists():
            return {"rows": 0, "errors": 0, "out": str(self.path)}
        paths = _hash_array(row["path"] for row in self._read())
        keep = keep_last(paths)
        if not keep.all():
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                lines = (line for line in src if line.strip())
                for line, kept in zip(lines, keep, strict=True):
                    if kept:
                        dst.write(line)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, self.path)
        rows = errors = 0
        for row in self._read():
            errors += "error" in row
            rows += "error" not in row
        return {"rows": rows, "errors": errors, "out": str(self.path)}


# ------------------------------------------------------------------------------------------------- Parquet


class ParquetWriter(_KeyedFile):
    """Results in one Parquet file, committed batch by batch as part files; see the module docstring.

    `columns` types the step's columns ({name: pyarrow type}); the item's fields and `error` come first and last.
    """

    def __init__(self, path: str | Path, columns: dict[str, Any], overwrite: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.overwrite = check_output_file(path, (".parquet",), "Parquet"), overwrite
        self.schema = pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string()),
                                 pa.field("width", pa.int32()), pa.field("height", pa.int32()),
                                 pa.field("text", pa.string()), *(pa.field(n, t) for n, t in columns.items()),
                                 pa.field("error", pa.string())])
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.parts.mkdir(exist_ok=True)
        for stale in self.parts.glob(".*.tmp"):  # a part a killed job was writing
            stale.unlink(missing_ok=True)
        keys = []
        for source in self._sources():
            try:
                keys += pq.read_table(source, columns=["key"]).column("key").to_pylist()
            except Exception as e:  # pyarrow raises several types for a file that is not Parquet
                raise InputError(f"cannot read '{source}' ({str(e).splitlines()[0]}): it is not a Parquet file "
                                 "this command wrote; choose another --out") from None
        self.keys = np.sort(_hash_array(keys))
        self.next_part = 1 + max((int(p.stem.split("-")[1]) for p in self.parts.glob("part-*.parquet")), default=0)

    def _sources(self) -> list[Path]:
        """The file (when it exists) and then its parts, oldest first: the order rows were written in."""
        parts = sorted(self.parts.glob("part-*.parquet"))
        return ([self.path] if self.path.exists() else []) + parts

    def write(self, batch: list[Decoded], columns: dict[str, Any], failures: list[Failure]) -> None:
        """Commit the batch as one part file (written under a temporary name, then renamed)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not batch and not failures:
            return
        rows = [_row(d, columns, i) for i, d in enumerate(batch)] + [_error_row(f) for f in failures]
        table = pa.table({f.name: [r.get(f.name) for r in rows] for f in self.schema}, schema=self.schema)
        part = self.parts / f"part-{self.next_part:08d}.parquet"
        tmp = self.parts / f".{part.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, part)
        self.next_part += 1

    def finish(self) -> dict[str, Any]:
        """Merge the file and its parts into a new file (one row per path, the last), then remove the parts."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sources = self._sources()
        if len(sources) > 1 or (sources and sources[0] != self.path):
            files = [pq.ParquetFile(s) for s in sources]
            paths = _hash_array(p for f in files for b in f.iter_batches(columns=["path"]) for p in
                                b.column(0).to_pylist())
            keep, at = keep_last(paths), 0
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with pq.ParquetWriter(tmp, self.schema) as out:
                for f in files:
                    for b in f.iter_batches(batch_size=65536):
                        mask = keep[at : at + b.num_rows]
                        at += b.num_rows
                        if mask.any():
                            out.write_table(_conform(pa.Table.from_batches([b]).filter(pa.array(mask)), self.schema))
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        shutil.rmtree(self.parts, ignore_errors=True)
        if not self.path.exists():
            return {"rows": 0, "errors": 0, "out": str(self.path)}
        error = pq.read_table(self.path, columns=["error"]).column("error")
        return {"rows": error.null_count, "errors": len(error) - error.null_count, "out": str(self.path)}


def _conform(table, schema):
    """`table` with the file's columns (missing ones null) in its order and types: a file written by an earlier run
    may lack a column (e.g. `captions`) this run has."""
    import pyarrow as pa

    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
            for f in schema]
    return pa.table(cols, schema=schema)
