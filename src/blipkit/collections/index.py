"""`Index`: a persistent, searchable LanceDB table of images embedded by one model.

    import blipkit
    index = blipkit.Index("photos.db", "scenes-blip")
    index.add(["photos/"], recursive=True)         # resumable: a rerun skips what is done
    index.search_text("a red circle", k=5)          # [{"path", "score", "itc", "itm", ...}, ...]
    index.search_image("query.png", k=5)
    len(index), index.to_arrow(), index.errors()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import BlipBase
from ..errors import InputError
from ..tasks.zeroshot import DEFAULT_TEMPLATES
from . import store
from .decode import DEFAULT_MAX_PIXELS
from .engine import COMMIT_SECONDS, Summary, run_job
from .readers import read_sources
from .search import DEFAULT_RERANK, search_image, search_text
from .steps import EmbedStep

if TYPE_CHECKING:
    from .ray_executor import RayOptions

DEFAULT_MODEL = "scenes-blip"
EXECUTORS = ("local", "ray")


class Index:
    """The image table `table` of the LanceDB database `db`, with the model that embeds its images.

    Args:
        db: database directory (created by the first `add`), or an object store's URI (`s3://BUCKET/PATH`; see
            `store`).
        model: a loaded model or a name for `blipkit.load`; None: the model the table was built with (or
            scenes-blip for a new table).
        table: table name; failures go to `{table}_errors`.
        features, caption, labels, templates: optional columns (see `blipkit.collections.steps`); a table keeps
            the columns it was created with.
        ann: "auto" (index from `store.ANN_MIN_ROWS` rows on), "none" (exact search), "ivf_pq" or "hnsw".
    """

    def __init__(self, db: str | Path, model: BlipBase | str | None = None, table: str = "images",
                 features: bool = False, caption: bool = False, labels: Sequence[str] | None = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES, ann: str = "auto", device: str | None = None,
                 dtype: str | None = None) -> None:
        if ann not in store.ANN_CHOICES:
            raise InputError(f"ann={ann!r}: use one of {', '.join(store.ANN_CHOICES)}")
        self.db, self.name, self.ann = db, table, ann
        self.options = {"features": features, "caption": caption, "labels": list(labels or []),
                        "templates": list(templates)}
        self._model, self._model_spec, self._device, self._dtype = None, model, device, dtype
        if isinstance(model, BlipBase):
            self._model = model
        self._table = None

    # ------------------------------------------------------------------ model and table
    def _stored(self) -> dict[str, Any] | None:
        """The settings of the table when it exists."""
        db = store.location(self.db)  # a directory or an object store's URI
        if not store.is_uri(db) and not db.is_dir():
            return None
        return store.settings_of(store.open_table(db, self.name)) if self.name in store.table_names(db) else None

    @property
    def model(self) -> BlipBase:
        """The model (loaded on first use: the one given, else the table's, else scenes-blip)."""
        if self._model is None:
            import blipkit

            spec = self._model_spec
            if spec is None:
                stored = self._stored()
                spec = stored["model"] if stored else DEFAULT_MODEL
            self._model = blipkit.load(spec, device=self._device, dtype=self._dtype)
        return self._model

    def _read(self):
        """(table, settings) for searching: the table must exist and match the model."""
        if self._table is None:
            self._table = store.open_table(store.connect(self.db, write=False), self.name)
        if store.settings_of(self._table).get("task", "index") != "index":
            raise InputError(f"table '{self.name}' in '{self.db}' holds captions, not image embeddings: search a "
                             "table built by `blipkit index`")
        settings = EmbedStep(self.model).settings()
        return self._table, store.check_same_model(self._table, settings, self.db)

    # ------------------------------------------------------------------ API
    def add(self, sources: str | Path | Iterable[str | Path], recursive: bool = False, batch_size: int = 32,
            workers: int | None = None, progress: bool = False, path_column: str | None = None,
            text_column: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, executor: str = "local",
            ray: RayOptions | None = None, commit_seconds: float | None = None) -> Summary:
        """Embed and store the images of `sources` not yet in the table; returns the job's Summary.

        Sources are files, folders, globs, path lists, Parquet/CSV/JSON-lines tables, `.tar` shards or blipkit
        tables (see `blipkit.collections.readers`). Bad images become rows of the errors table; the job goes on.
        `executor="ray"` runs the same job on Ray Data (`ray`: cluster address, actors, GPUs; see `ray_executor`).
        Locally, results are committed at least `commit_seconds` apart (default 1 s; 0: every batch; see
        `engine.run_job`); with ray, every `ray.commit_rows` rows.
        """
        if executor not in EXECUTORS:
            raise InputError(f"executor={executor!r}: use one of {', '.join(EXECUTORS)}")
        if executor == "ray":
            from .ray_executor import refuse_local_options

            refuse_local_options(commit_seconds=commit_seconds)
        items = read_sources(sources, recursive, path_column, text_column)
        if next(iter(items), None) is None:
            raise InputError(f"sources {' '.join(map(str, items.specs))} hold no images"
                             + ("" if recursive else " (pass recursive=True / --recursive for subfolders)"))
        step = EmbedStep(self.model, **self.options)
        writer = store.TableWriter(self.db, self.name, step.settings(), self.ann)
        stored = writer.settings  # an existing table keeps its columns: compute those
        if (bool(stored["features"]), stored["caption"], stored["labels"]) != (
            self.options["features"], self.options["caption"], self.options["labels"]
        ):
            step = EmbedStep(self.model, features=bool(stored["features"]), caption=stored["caption"],
                             labels=stored["labels"], templates=stored["templates"] or DEFAULT_TEMPLATES)
        self._table = None
        if executor == "ray":
            from .ray_executor import ModelStep, run_job_ray

            spec = self._model_spec if isinstance(self._model_spec, BlipBase) else self.model.name_or_path
            options = {"features": bool(stored["features"]), "caption": stored["caption"], "labels": stored["labels"],
                       "templates": step.templates}
            return run_job_ray(items, ModelStep(EmbedStep, spec, options, self._dtype), writer, step.processor,
                               batch_size, ray, max_pixels, progress, desc=f"index {self.name}")
        return run_job(items, step, writer, batch_size, workers, max_pixels, progress, desc=f"index {self.name}",
                       commit_seconds=COMMIT_SECONDS if commit_seconds is None else commit_seconds)

    def search_text(self, text: str, k: int = 10, rerank: int = DEFAULT_RERANK, where: str | None = None,
                    **ann) -> list[dict[str, Any]]:
        """The `k` images that best match `text` (ITC, then ITM re-ranking of the best max(rerank, k))."""
        table, settings = self._read()
        return search_text(self.model, table, settings, text, k, rerank, where, **ann)

    def search_image(self, image: Any, k: int = 10, where: str | None = None, **ann) -> list[dict[str, Any]]:
        """The `k` images most similar to `image` (a path, PIL image or tensor) by ITC."""
        table, settings = self._read()
        return search_image(self.model, table, settings, image, k, where, **ann)

    def __len__(self) -> int:
        """Rows in the table (0 before the first add)."""
        if self._stored() is None:
            return 0
        return store.open_table(store.connect(self.db, write=False), self.name).count_rows()

    def to_arrow(self, columns: Sequence[str] | None = None):
        """The table (or some of its columns) as a pyarrow Table."""
        table = store.open_table(store.connect(self.db, write=False), self.name)
        return table.to_table(columns=list(columns) if columns else None)

    def errors(self):
        """The error records (key, path, reason, time) as a pyarrow Table (empty when nothing failed)."""
        db, name = store.connect(self.db, write=False), f"{self.name}_errors"
        if name not in store.table_names(db):
            return store.errors_schema().empty_table()
        return store.open_table(db, name).to_table()
