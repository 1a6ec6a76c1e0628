"""The LanceDB side: a database directory, the image table and its sibling errors table, commits, ANN indexes.

Every `write` is one `Table.add`, one atomic Lance version: a process killed at any moment leaves the table at the
last committed batch. Keys of both tables are read once when the job starts (as 64-bit hashes, 8 bytes a row) so
done items are skipped without touching their files. Errors go first, then results: a crash between the two leaves
the failed keys recorded and the good ones to redo, never a row twice. A file edited since it was indexed has a new
key: its old row is deleted before the new one is added (a crash between loses the row until the rerun adds it).

A database is a local directory or an object-store URI (`s3://BUCKET/PATH`, also `gs://`, `az://`): Lance writes
there itself, taking credentials, region and endpoint from the environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP` for an S3-compatible store over http).
Commits stay atomic there: a Lance version is one manifest, put once.

The model that built the table (name, fingerprint) and the columns' settings live in the schema metadata under
`blipkit`; opening the table with another model is an error, as are column settings the table does not have.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .decode import Decoded, Failure
from .engine import key_hash

META_KEY = b"blipkit"
ANN_MIN_ROWS = 100_000  # `ann="auto"` indexes from this many vectors on (BLIP-2: rows x 32); below, exact is fast
ANN_MIN_TRAIN = 512  # fewer rows cannot train the product quantiser's 256 centroids per sub-vector
ANN_TYPES = {"ivf_pq": "IVF_PQ", "hnsw": "IVF_HNSW_SQ"}
ANN_CHOICES = ("auto", "none", *ANN_TYPES)
CAPTION_SETTINGS = ("options", "seed", "prefix", "suffix", "captions")  # a caption table keeps these


def lance_module():
    """The `lance` module (pylance), imported on first use; a clear error when it is not installed."""
    os.environ.setdefault("LANCE_LOG", "error")  # Lance's notices ("creating a new dataset") are not for users
    try:
        import lance
    except ImportError:
        raise InputError("collections need pylance: pip install 'blipkit[index]'") from None
    return lance


def is_uri(db: str | Path) -> bool:
    """Whether `db` names a database in an object store (`s3://...`) rather than a local directory."""
    return isinstance(db, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", db) is not None \
        and not db.startswith("file://")


def location(db: str | Path) -> Path | str:
    """Where a database lives: the URI of an object store (no trailing slash) or the local directory."""
    return db.rstrip("/") if is_uri(db) else Path(db).expanduser()


def connect(db: str | Path, write: bool) -> Path | str:
    """A database, checked: a directory created for writing and that must exist for reading; an object-store URI
    whose bucket answers (and, for reading, that holds tables)."""
    if is_uri(db):
        uri = location(db)
        if not table_names(uri) and not write:  # listed either way: an unreachable bucket fails here
            raise InputError(f"no database at '{db}': build one with `blipkit index SOURCES --db {db}`")
        return uri
    path = Path(db).expanduser()
    if write:
        if path.exists() and not path.is_dir():
            raise InputError(f"database '{db}' is a file, not a directory: pass a directory for --db")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create database directory '{db}' ({e.strerror or e})") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"database '{db}' is read-only: pass a writable --db directory")
    elif not path.is_dir():
        raise InputError(f"no database at '{db}': build one with `blipkit index SOURCES --db {db}`")
    return path


def table_names(db: Path | str) -> list[str]:
    """Tables of a database (LanceDB's layout: one NAME.lance directory each)."""
    if not is_uri(db):
        return sorted(p.name[: -len(".lance")] for p in db.glob("*.lance") if p.is_dir())
    import lancedb

    names, token = [], None
    try:
        conn = lancedb.connect(db)
        while True:
            page = conn.list_tables(page_token=token)
            names += page.tables
            token = page.page_token
            if not token:
                return sorted(names)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot reach database '{db}' ({_store_error(e)}): check the bucket exists and the AWS_* "
                         "credentials, region and endpoint in the environment") from None


def _store_error(e: BaseException) -> str:
    """The gist of an object store's error (Lance reports the whole request chain on one line)."""
    text = str(e)
    code = re.search(r"<Code>(\w+)</Code>", text)  # S3's own: NoSuchBucket, AccessDenied, InvalidAccessKeyId, ...
    if code:
        return code.group(1)
    if re.search(r"connection refused", text, re.IGNORECASE):
        return "connection refused"
    return text.splitlines()[0][:160] if text else type(e).__name__


def table_uri(db: Path | str, name: str) -> str:
    """Where table `name` lives in database `db`."""
    return f"{db}/{name}.lance" if is_uri(db) else str(db / f"{name}.lance")


def open_table(db: Path | str, name: str):
    """An existing table as a Lance dataset, or a clear error naming the tables there are."""
    if name not in table_names(db):
        have = ", ".join(n for n in table_names(db) if not n.endswith("_errors")) or "none"
        raise InputError(f"database '{db}' has no table '{name}' (tables: {have}); index images into it first")
    return lance_module().dataset(table_uri(db, name))


def settings_of(table) -> dict[str, Any]:
    """The blipkit settings stored with a table (model, fingerprint, columns)."""
    meta = table.schema.metadata or {}
    if META_KEY not in meta:
        raise InputError(f"table '{table.uri}' was not written by blipkit (no '{META_KEY.decode()}' metadata)")
    return json.loads(meta[META_KEY])


def check_same_model(table, settings: dict[str, Any], db: str | Path) -> dict[str, Any]:
    """The table's settings, after checking they were made by the same model; InputError naming both otherwise."""
    stored = settings_of(table)
    if stored["fingerprint"] != settings["fingerprint"]:
        raise InputError(
            f"table '{Path(table.uri).stem}' in '{db}' was built with model '{stored['model']}' (fingerprint "
            f"{stored['fingerprint']}), not '{settings['model']}' ({settings['fingerprint']}): pass --model "
            f"{stored['model']}, or use another --table"
        )
    return stored


def schema(settings: dict[str, Any]):
    """The Arrow schema of a table with these settings (metadata included): the item columns, then the step's."""
    import pyarrow as pa

    fields = [pa.field("key", pa.string(), nullable=False), pa.field("path", pa.string(), nullable=False),
              pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("text", pa.string())]
    if settings.get("task") == "caption":
        fields.append(pa.field("caption", pa.string()))
        if settings["captions"] > 1:
            fields.append(pa.field("captions", pa.list_(pa.string())))
    else:
        d = settings["dim"]
        fields.append(pa.field("embedding", pa.list_(pa.float32(), d)))
        if settings["queries"]:
            fields.append(pa.field("queries", pa.list_(pa.list_(pa.float32(), d))))
        if settings["features"]:
            fields.append(pa.field("features", pa.list_(pa.float16(), int(np.prod(settings["features"])))))
        if settings["caption"]:
            fields.append(pa.field("caption", pa.string()))
        if settings["labels"]:
            fields += [pa.field("label", pa.string()),
                       pa.field("label_scores", pa.list_(pa.float32(), len(settings["labels"])))]
    meta = dict(settings, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta).encode()})


def errors_schema():
    """The Arrow schema of the errors table: one row per item that failed, with the reason."""
    import pyarrow as pa

    return pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("path", pa.string(), nullable=False),
                      pa.field("reason", pa.string()), pa.field("time", pa.timestamp("s"))])


def _fixed(values: np.ndarray, type_):
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), type_.list_size)


def _hashes(table, column: str = "key") -> np.ndarray:
    """Sorted 64-bit hashes of a string column of a table, read batch by batch."""
    out = [np.array([key_hash(k) for k in b.column(0).to_pylist()], dtype=np.int64)
           for b in table.to_batches(columns=[column], batch_size=65536)]
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def _contains(sorted_hashes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    if len(sorted_hashes) == 0:
        return np.zeros(len(hashes), dtype=bool)
    at = np.searchsorted(sorted_hashes, hashes).clip(max=len(sorted_hashes) - 1)
    return sorted_hashes[at] == hashes


class TableWriter:
    """Writes a job's batches to `table` (created with `settings` when new) and its failures to `table_errors`.

    `settings` come from the step (`EmbedStep.settings()`, `CaptionStep.settings()`); with `overwrite` every item is
    computed again and its row replaced (the default skips the keys already in either table).
    """

    def __init__(self, db: str | Path, table: str, settings: dict[str, Any], ann: str = "auto",
                 overwrite: bool = False) -> None:
        if ann not in ANN_CHOICES:
            raise InputError(f"ann={ann!r}: use one of {', '.join(ANN_CHOICES)}")
        self.name, self.ann, self.overwrite = table, ann, overwrite
        self.db = connect(db, write=True)
        self.lance = lance_module()
        names = table_names(self.db)
        if table in names:
            self.table = open_table(self.db, table)
            stored = check_same_model(self.table, settings, db)
            self.settings = _merge_settings(stored, settings, table)
        else:
            self.settings = settings
            empty = schema(settings).empty_table()
            self.table = self.lance.write_dataset(empty, table_uri(self.db, table), schema=empty.schema, mode="create")
        self.schema = self.table.schema
        self.errors = open_table(self.db, f"{table}_errors") if f"{table}_errors" in names else None
        self.done_keys = _hashes(self.table)
        self.failed_keys = _hashes(self.errors) if self.errors is not None else np.zeros(0, dtype=np.int64)
        self.paths = _hashes(self.table, "path")

    def done(self, keys: list[str]) -> list[bool]:
        """Whether each key is in the table or the errors table already (never, with overwrite)."""
        if self.overwrite:
            return [False] * len(keys)
        h = np.array([key_hash(k) for k in keys], dtype=np.int64)
        return (_contains(self.done_keys, h) | _contains(self.failed_keys, h)).tolist()

    def write(self, batch: list[Decoded], columns: dict[str, Any], failures: list[Failure]) -> None:
        """Commit one batch: its failures to the errors table, then its rows (each one atomic Lance version)."""
        import pyarrow as pa

        failed = np.array([key_hash(f.item.key) for f in failures], dtype=np.int64)
        failures = [f for f, known in zip(failures, _contains(self.failed_keys, failed), strict=True) if not known]
        if failures:  # (a key already recorded failed again: with overwrite; its record stays as it is)
            rows = pa.table({"key": [f.item.key for f in failures], "path": [f.item.path for f in failures],
                             "reason": [f.reason for f in failures],
                             "time": pa.array([int(time.time())] * len(failures), pa.timestamp("s"))},
                            schema=errors_schema())
            mode = "create" if self.errors is None else "append"
            self.errors = self.lance.write_dataset(rows, table_uri(self.db, f"{self.name}_errors"), mode=mode)
        if not batch:
            return
        paths = [d.item.path for d in batch]
        stale = _contains(self.paths, np.array([key_hash(p) for p in paths], dtype=np.int64))
        if stale.any():  # edited files: their earlier rows go first
            self.table.delete("path IN (" + ", ".join(_sql_str(p) for p, s in zip(paths, stale, strict=True)
                                                        if s) + ")")
        self.table = self.lance.write_dataset(self._arrow(batch, columns), self.table.uri, mode="append")

    def _arrow(self, batch: list[Decoded], columns: dict[str, Any]):
        import pyarrow as pa

        data: dict[str, Any] = {
            "key": [d.item.key for d in batch], "path": [d.item.path for d in batch],
            "width": [d.width for d in batch], "height": [d.height for d in batch],
            "text": [d.item.text for d in batch],
        }
        for f in self.schema:
            if f.name in data:
                continue
            if f.name not in columns:
                raise InputError(f"table '{self.name}' has a column '{f.name}' that this job does not compute")
            value = columns[f.name]
            if pa.types.is_fixed_size_list(f.type):
                data[f.name] = _fixed(np.asarray(value, dtype=f.type.value_type.to_pandas_dtype()), f.type)
            elif pa.types.is_list(f.type) and pa.types.is_fixed_size_list(f.type.value_type):  # multivector (N, Q, D)
                inner = _fixed(np.asarray(value, dtype=np.float32), f.type.value_type)
                q = np.asarray(value).shape[1]
                data[f.name] = pa.ListArray.from_arrays(pa.array(np.arange(len(batch) + 1, dtype=np.int32) * q), inner)
            else:
                data[f.name] = pa.array(value, f.type)
        return pa.table(data, schema=self.schema)

    def finish(self) -> dict[str, Any]:
        """Compact the batch fragments, build or update the ANN index; the table's size for the summary."""
        rows = self.table.count_rows()
        if len(self.table.get_fragments()) > 1:
            self.table.optimize.compact_files()  # one fragment per batch would slow every scan down
        index = ensure_index(self.table, self.settings, self.ann) if "dim" in self.settings else None
        self.table = self.lance.dataset(self.table.uri)
        return {"rows": rows, "errors": self.errors.count_rows() if self.errors is not None else 0,
                "ann": index, "version": self.table.version}


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _merge_settings(stored: dict[str, Any], wanted: dict[str, Any], table: str) -> dict[str, Any]:
    """The table's own column settings; asking for columns it lacks is an error (they would be missing for old rows)."""
    if stored.get("task", "index") != wanted.get("task", "index"):
        raise InputError(f"table '{table}' holds {stored.get('task', 'index')} results, not "
                         f"{wanted.get('task', 'index')} results: use another --table")
    if wanted.get("task") == "caption":
        mine, theirs = _flat({k: wanted[k] for k in CAPTION_SETTINGS}), _flat({k: stored[k] for k in CAPTION_SETTINGS})
        changed = [f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in sorted(set(mine) | set(theirs))
                   if mine.get(k) != theirs.get(k)]
        if changed:
            raise InputError(f"table '{table}' was captioned with other settings ({', '.join(changed)}): use the "
                             "same options or another --table")
        return stored
    for name, flag in (("features", "--features"), ("caption", "--caption")):
        if wanted[name] and not stored[name]:
            raise InputError(f"table '{table}' was built without {flag}: index into a new --table to have {name}")
    if wanted["labels"] and wanted["labels"] != stored["labels"]:
        raise InputError(f"table '{table}' has labels {stored['labels'] or 'none'}, not {wanted['labels']}: "
                         "use the same --labels or another --table")
    return stored


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """Nested settings as {"options.num_beams": 3, ...}."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        out.update({f"{k}.{kk}": vv for kk, vv in _flat(v).items()} if isinstance(v, dict) else {k: v})
    return out


def vector_column(settings: dict[str, Any]) -> str:
    """The column searched for text queries: BLIP-2's query vectors, else the embedding."""
    return "queries" if settings["queries"] else "embedding"


def vector_indices(table, column: str) -> list[str]:
    """Index types (e.g. "IVF_PQ") of the vector indexes on `column`."""
    return [str(i.index_type) for i in table.describe_indices() if column in i.field_names]


def pq_sub_vectors(dim: int) -> int:
    """Product-quantiser sub-vectors: one per 4 dimensions (64 for a 256-d embedding; measured: one per 8 needs
    several times the re-scored candidates for the same recall, see docs/collections.md)."""
    return next(n for n in (dim // 4, dim // 8, 1) if n >= 1 and dim % n == 0)


def ensure_index(table, settings: dict[str, Any], ann: str) -> str | None:
    """Build the ANN index when asked (or, with "auto", once the table holds ANN_MIN_ROWS vectors: rows, or rows x
    query vectors for BLIP-2); fold new rows in after."""
    column = vector_column(settings)
    existing = vector_indices(table, column)
    rows = table.count_rows()
    vectors = rows * max(1, settings["queries"])  # BLIP-2's rows hold 32 vectors each: exact MaxSim scans them all
    if ann == "none" or (ann == "auto" and not existing and vectors < ANN_MIN_ROWS):
        return existing[0] if existing else None
    if existing and ann in ("auto", next((k for k, v in ANN_TYPES.items() if v == existing[0]), None)):
        table.optimize.optimize_indices()  # new rows join the index (searched exactly until then)
        return existing[0]
    if rows < ANN_MIN_TRAIN:
        raise InputError(f"an ANN index needs {ANN_MIN_TRAIN} rows at least; table '{Path(table.uri).stem}' has "
                         f"{rows}: use --ann none (exact search) until it grows")
    kind = ANN_TYPES.get(ann, "IVF_PQ")
    params: dict[str, Any] = {"metric": "cosine", "num_partitions": max(1, min(4096, int(np.sqrt(rows)))),
                              "replace": True}
    if kind == "IVF_PQ":
        params["num_sub_vectors"] = pq_sub_vectors(settings["dim"])
    table.create_index(column, kind, **params)
    return kind
