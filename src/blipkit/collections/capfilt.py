"""CapFilt (BLIP, section 3.3): bootstrap a cleaner captioned dataset from noisy image-text pairs.

For each image of an annotation file a captioner writes `samples` synthetic captions (nucleus sampling, p = 0.9, or
beam search), and the filter's ITM head scores every web and synthetic caption against the image; a caption is kept
when its match probability is at least `threshold` (0.5: the head's argmax). The job is one step on the collection
engine (`engine.run_job`): annotations are read into items keyed by the image file and its web captions, a batched
`CapFiltStep` captions and scores them, and a `CapFiltWriter` commits each batch as one Parquet part written to a
temporary name and renamed into place, at least `commit_seconds` apart, so `kill -9` loses at most that much work
and a rerun skips every image already done. With `executor="ray"` the same step and writer run on Ray Data
(`ray_executor.run_job_ray`: one captioner and filter per actor, parts of `commit_rows` rows); sampled captions are
seeded per image, so both executors write the same candidates. At the end the parts become:

- `DIR/candidates.parquet`: every candidate, `image` (as the annotations wrote it), `caption`, `source` ("web" or
  "synthetic"), `score` (ITM match probability), `verdict` ("keep" / "drop"), `sample` (0 for web captions, 1..N);
- `DIR/annotations.json` (`annotations.parquet` for Parquet input): the kept pairs, synthetic ones included, in the
  input's format with its image paths;
- `DIR/capfilt.json`: the settings (models, decoding, threshold) and the counts.

Scores are stored, so a rerun with another threshold only rewrites the outputs (no model call). Another captioner,
filter or decoding on the same `DIR` is an error: use another `--out`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..base import BlipBase
from ..errors import InputError
from .caption import item_seed
from .decode import Decoded, Failure
from .engine import COMMIT_SECONDS, Summary, key_hash, pixels, run_job
from .readers import Item, file_item

if TYPE_CHECKING:
    from .ray_executor import RayOptions

DECODINGS = ("nucleus", "beam")
SETTINGS_FILE = "capfilt.json"
PARTS = "parts"


# --------------------------------------------------------------------------------------------------- annotations


@dataclass
class Annotations:
    """Captioned images read from an annotation file: one entry per image, its web captions in order.

    `format` is how the input was written ("list": `[{"image", "caption"}]`; "karpathy": `{"images": [{"filepath",
    "filename", "sentences"}]}`; "parquet"; "folder": images with sidecar `.txt` captions or a `metadata.jsonl`),
    which is how the kept pairs are written back. `images[i]` is the path as the input wrote it, `files[i]` the file.
    """

    source: Path
    format: str
    images: list[str]
    files: list[Path]
    captions: list[list[str]]
    columns: tuple[str, str] = ("image", "caption")
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.images)


def read_annotations(path: str | Path, image_root: str | Path | None = None, skip_bad: bool = False) -> Annotations:
    """Read a JSON list of `{"image", "caption"}`, a Karpathy JSON, a Parquet table or a folder with captions.

    Every entry is checked before any work starts: a missing or unreadable image, an entry without a caption (or an
    empty one) and a file that is not valid JSON are one `InputError` naming the file and the entry (with
    `skip_bad`, bad entries are skipped and counted instead).
    """
    from ..data.readers import read_folder, read_karpathy

    path = Path(path).expanduser()
    if path.is_dir():
        loaded, fmt = read_folder(path, skip_bad), "folder"
        files = [Path(it.image) for it in loaded.items]
        return Annotations(path, fmt, [it.key for it in loaded.items], files, [it.captions for it in loaded.items],
                           skipped=loaded.skipped)
    if not path.is_file():
        raise InputError(f"annotations '{path}' do not exist: pass a JSON file, a Parquet table or a folder")
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, image_root, skip_bad)
    if path.suffix.lower() != ".json":
        raise InputError(f"annotations '{path}': expected .json (a list of {{'image', 'caption'}} or Karpathy), "
                         ".parquet or a folder of images with captions")
    _check_blank_captions(path, skip_bad)
    loaded = read_karpathy(path, image_root, None, skip_bad)
    with open(path, encoding="utf-8") as f:
        fmt = "karpathy" if isinstance(json.load(f), dict) else "list"
    if not loaded.items:
        raise InputError(f"{path}: no usable entries (skipped {loaded.skipped} bad ones)")
    return Annotations(path, fmt, [it.key for it in loaded.items], [Path(it.image) for it in loaded.items],
                       [list(dict.fromkeys(it.captions)) for it in loaded.items], skipped=loaded.skipped)


def _check_blank_captions(path: Path, skip_bad: bool) -> None:
    """An empty caption string in a list entry is an error naming the entry (the reader would drop it quietly)."""
    if skip_bad:
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); fix the file") from None
    if not isinstance(data, list):
        return
    for i, e in enumerate(data):
        caps = e.get("caption") if isinstance(e, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if isinstance(caps, list) and any(isinstance(c, str) and not c.strip() for c in caps):
            raise InputError(f"{path}: entry {i} ({e.get('image')}): has an empty caption (fix the entry, or pass "
                             "--skip-bad to skip such entries)")


def _read_parquet(path: Path, image_root: str | Path | None, skip_bad: bool) -> Annotations:
    from ..data.readers import image_problem
    from .readers import PATH_COLUMNS, TEXT_COLUMNS

    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError:
        raise InputError("Parquet annotations need pyarrow: pip install 'blipkit[index]'") from None
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"cannot read Parquet file '{path}' ({e}): pass a Parquet table") from None
    names = table.column_names
    pc = next((c for c in PATH_COLUMNS if c in names), None)
    tc = next((c for c in TEXT_COLUMNS if c in names), None)
    if pc is None or tc is None:
        raise InputError(f"{path} needs an image column ({', '.join(PATH_COLUMNS)}) and a caption column "
                         f"({', '.join(TEXT_COLUMNS)}); it has: {', '.join(names)}")
    root = Path(image_root) if image_root is not None else path.parent
    order: dict[str, int] = {}
    images, files, captions, skipped = [], [], [], 0
    for n, (image, caption) in enumerate(zip(table.column(pc).to_pylist(), table.column(tc).to_pylist(),
                                             strict=True)):
        problem = None
        if not isinstance(image, str) or not image.strip():
            problem = f"the image is {image!r}"
        elif not isinstance(caption, str) or not caption.strip():
            problem = f"has an empty caption ({caption!r})"
        elif image not in order:
            problem = image_problem(root / image, skip_bad)
        if problem:
            if not skip_bad:
                raise InputError(f"{path}: row {n} ({image}): {problem} (fix the row, or pass --skip-bad to skip "
                                 "such rows)")
            skipped += 1
            continue
        if image not in order:
            order[image] = len(images)
            images.append(image)
            files.append(root / image)
            captions.append([])
        if caption not in captions[order[image]]:
            captions[order[image]].append(caption)
    if not images:
        raise InputError(f"{path}: no usable rows (skipped {skipped} bad ones)")
    return Annotations(path, "parquet", images, files, captions, (pc, tc), skipped)


# --------------------------------------------------------------------------------------------------- the step


def model_fingerprint(model: BlipBase) -> str:
    """A short hash of a model: its config, preprocessing and a strided sample of every weight tensor."""
    h = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True, default=str).encode())
    if model.processor is not None:
        h.update(json.dumps(model.processor.to_hf(), sort_keys=True).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class CapFiltStep:
    """A batch of decoded images -> for each, its candidates (web captions, then synthetic ones) and their scores.

    Each item carries its web captions as `item.text` (a JSON list), so the step is the same wherever it runs (a
    Ray actor gets the captions with the images). Columns: `candidates` (list of (source, sample, caption) per image)
    and `scores` (list of float per image). Sampled captions come from each image's own generator, seeded by `seed`
    and the item's key (as `caption.CaptionStep`): they do not depend on the batch, the executor or a resume.
    """

    def __init__(self, captioner: BlipBase, filter: BlipBase, samples: int = 1, decoding: str = "nucleus",
                 top_p: float = 0.9, min_new_tokens: int = 5, max_new_tokens: int = 30, num_beams: int = 3,
                 seed: int = 0) -> None:
        if decoding not in DECODINGS:
            raise InputError(f"decoding={decoding!r}: use one of {', '.join(DECODINGS)}")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise InputError(f"samples={samples!r}: give 0 or more synthetic captions per image")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise InputError(f"seed={seed!r}: give a whole number from 0 to 2**63 - 1")
        if samples:
            captioner.require("caption", "write synthetic captions")
        filter.require("itm", "filter captions")
        if samples and decoding == "beam" and num_beams < samples:
            raise InputError(f"beam search keeps the best beams: num_beams={num_beams} < samples={samples}; give "
                             f"num_beams >= {samples}")
        if samples and captioner.processor.to_hf() != filter.processor.to_hf():
            raise InputError(f"captioner {captioner.name_or_path} and filter {filter.name_or_path} preprocess images "
                             "differently: pick two models of the same image size and normalisation")
        self.captioner, self.filter, self.processor = captioner, filter, filter.processor
        self.samples, self.decoding = samples, decoding
        self.generate = {"top_p": top_p, "min_new_tokens": min_new_tokens, "max_new_tokens": max_new_tokens}
        self.num_beams, self.seed = num_beams, seed

    def _synthetic(self, feats: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """`samples` captions of each image from its features (the captioner's ViT output)."""
        if not self.samples:
            return [[] for _ in keys]
        m, g = self.captioner, self.generate
        lengths = {"min_new_tokens": g["min_new_tokens"], "max_new_tokens": g["max_new_tokens"]}
        if self.decoding == "beam":  # deterministic, and each row kept to itself: the batch at once
            out = m.caption(feats, num_beams=self.num_beams, num_captions=self.samples, **lengths)
        else:  # batched, each image drawing from its own generator (one shared stream would tie it to its batch)
            gens = [torch.Generator(m.device).manual_seed(item_seed(self.seed, key)) for key in keys]
            out = m.caption(feats, do_sample=True, top_p=g["top_p"], num_captions=self.samples, generator=gens,
                            **lengths)
        return [o if isinstance(o, list) else [o] for o in out]

    @torch.inference_mode()
    def __call__(self, batch: list[Decoded]) -> dict[str, Any]:
        """Candidates and their ITM match probabilities for the decoded images of one batch."""
        keys = [d.item.key for d in batch]
        x = pixels(batch)
        feats = self.filter.image_features(x.to(self.filter.device, self.filter.dtype))  # one ViT pass per image
        if self.samples and self.captioner is not self.filter:
            synthetic = self._synthetic(self.captioner.image_features(x.to(self.captioner.device,
                                                                            self.captioner.dtype)), keys)
        else:
            synthetic = self._synthetic(feats, keys)
        candidates = []
        for d, syn in zip(batch, synthetic, strict=True):
            web = [("web", 0, c) for c in json.loads(d.item.text)]
            candidates.append(web + [("synthetic", s + 1, c) for s, c in enumerate(syn)])
        scores = [self.filter.match(feats[i : i + 1], [c for _, _, c in cands])[0].float().tolist()
                  for i, cands in enumerate(candidates)]  # each image against its own texts only
        return {"candidates": candidates, "scores": scores}


# --------------------------------------------------------------------------------------------------- the writer


def _schema():
    import pyarrow as pa

    return pa.schema([pa.field("index", pa.int64()), pa.field("key", pa.string()), pa.field("image", pa.string()),
                      pa.field("caption", pa.string()), pa.field("source", pa.string()),
                      pa.field("sample", pa.int32()), pa.field("score", pa.float32()),
                      pa.field("reason", pa.string())])


class CapFiltWriter:
    """Commits each batch as `DIR/parts/part-NNNNNN.parquet` (written aside, then renamed: atomic); `finish` writes
    the candidates table and the kept annotations (see the module docstring)."""

    def __init__(self, out: str | Path, annotations: Annotations, index_of: dict[str, int], threshold: float) -> None:
        import pyarrow.parquet as pq

        self.out, self.annotations, self.index_of, self.threshold = Path(out), annotations, index_of, threshold
        self.parts = self.out / PARTS
        self.parts.mkdir(parents=True, exist_ok=True)
        for tmp in self.parts.glob("*.tmp"):  # a batch that was being written when a run was killed
            tmp.unlink()
        done = set()
        names = sorted(self.parts.glob("part-*.parquet"))
        for p in names:
            done.update(key_hash(k) for k in pq.read_table(p, columns=["key"]).column("key").to_pylist())
        self.done_keys = done
        self.next = max(int(p.stem.split("-")[1]) for p in names) + 1 if names else 0
        self.token = os.urandom(4).hex()

    def done(self, items: list[Item] | list[str]) -> list[bool]:
        """Whether each item (an image with its web captions; or its key) was done by an earlier run."""
        return [key_hash(x.key if isinstance(x, Item) else x) in self.done_keys for x in items]

    def write(self, batch: list[Decoded], columns: dict[str, Any], failures: list[Failure]) -> None:
        """One Parquet part for the batch: a row per candidate, and a row per image that failed (with its reason)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows: dict[str, list] = {name: [] for name in _schema().names}

        def add(item: Item, caption, source, sample, score, reason) -> None:
            for name, value in zip(rows, (self.index_of[item.key], item.key, item.path, caption, source, sample,
                                          score, reason), strict=True):
                rows[name].append(value)

        for d, cands, scores in zip(batch, columns.get("candidates", []), columns.get("scores", []), strict=True):
            for (source, sample, caption), score in zip(cands, scores, strict=True):
                add(d.item, caption, source, sample, score, None)
        for f in failures:
            add(f.item, None, "error", 0, None, f.reason)
        if not rows["key"]:
            return
        part = self.parts / f"part-{self.next:06d}-{self.token}.parquet"  # the token: jobs sharing DIR never clash
        tmp = part.with_suffix(".parquet.tmp")
        pq.write_table(pa.table(rows, schema=_schema()), tmp)
        os.replace(tmp, part)  # the commit: a part is there whole or not at all
        self.next += 1
        self.done_keys.update(key_hash(d.item.key) for d in batch)
        self.done_keys.update(key_hash(f.item.key) for f in failures)

    def finish(self) -> dict[str, Any]:
        """Write `candidates.parquet` and the kept annotations from every part; counts for the summary."""
        return write_outputs(self.out, self.annotations, self.index_of, self.threshold)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(out: Path, annotations: Annotations, index_of: dict[str, int], threshold: float) -> dict[str, Any]:
    """The candidates table and the kept annotations, from the parts of the images still in `annotations`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parts = sorted((out / PARTS).glob("part-*.parquet"))
    tables = [pq.read_table(p) for p in parts] or [_schema().empty_table()]
    table = pa.concat_tables([t.append_column("part", pa.array([n] * t.num_rows, pa.int32()))
                              for n, t in enumerate(tables)])
    keep_keys = pa.array(list(index_of), pa.string())
    table = table.filter(pc.is_in(table.column("key"), value_set=keep_keys))  # rows of this annotation file only
    table = _first_per_key(table)
    # the entry of each key in this annotation file (a part's `index` is where the image was in the job that wrote it)
    table = table.set_column(table.schema.get_field_index("index"), "index",
                             pa.array([index_of[k] for k in table.column("key").to_pylist()], pa.int64()))
    errors = table.filter(pc.equal(table.column("source"), "error"))
    table = table.filter(pc.not_equal(table.column("source"), "error"))
    table = table.sort_by([("index", "ascending"), ("sample", "ascending")])
    scores = table.column("score").to_numpy(zero_copy_only=False)
    verdict = pa.array(["keep" if s >= threshold else "drop" for s in scores], pa.string())
    image = pa.array([annotations.images[i] for i in table.column("index").to_pylist()], pa.string())
    result = pa.table({"image": image, "caption": table.column("caption"), "source": table.column("source"),
                       "sample": table.column("sample"), "score": table.column("score"), "verdict": verdict})
    _atomic_write(out / "candidates.parquet", lambda p: pq.write_table(result, p))
    kept = result.filter(pc.equal(result.column("verdict"), "keep"))
    name = write_annotations(out, annotations, kept.column("image").to_pylist(), kept.column("caption").to_pylist())
    source = result.column("source").to_pylist()
    counts = {
        "images": len({i for i in table.column("index").to_pylist()}),
        "errors": errors.num_rows,
        "web": source.count("web"),
        "synthetic": source.count("synthetic"),
        "web_kept": sum(1 for s, v in zip(source, verdict.to_pylist(), strict=True) if s == "web" and v == "keep"),
        "synthetic_kept": sum(1 for s, v in zip(source, verdict.to_pylist(), strict=True)
                              if s == "synthetic" and v == "keep"),
        "annotations": str(out / name),
        "candidates": str(out / "candidates.parquet"),
    }
    if errors.num_rows:
        failed = [{"image": annotations.images[i], "reason": r}
                  for i, r in zip(errors.column("index").to_pylist(), errors.column("reason").to_pylist(),
                                  strict=True)]
        _atomic_write(out / "errors.json", lambda p: p.write_text(json.dumps(failed, indent=1) + "\n"))
    return counts


def _first_per_key(table):
    """Each key's rows from one part only, its first: two jobs sharing a DIR may both have done an image."""
    import pyarrow as pa

    first: dict[str, int] = {}
    for key, part in zip(table.column("key").to_pylist(), table.column("part").to_pylist(), strict=True):
        first.setdefault(key, part)
    mask = [first[k] == p for k, p in zip(table.column("key").to_pylist(), table.column("part").to_pylist(),
                                          strict=True)]
    return table.filter(pa.array(mask, pa.bool_()))


def write_annotations(out: Path, annotations: Annotations, images: Sequence[str], captions: Sequence[str]) -> str:
    """Kept pairs in the input's format (image paths as the input wrote them); returns the file name written."""
    if annotations.format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pc, tc = annotations.columns
        table = pa.table({pc: pa.array(list(images), pa.string()), tc: pa.array(list(captions), pa.string())})
        _atomic_write(out / "annotations.parquet", lambda p: pq.write_table(table, p))
        return "annotations.parquet"
    if annotations.format == "karpathy":
        data = json.loads(annotations.source.read_text(encoding="utf-8"))
        by_image: dict[str, list[str]] = {}
        for image, caption in zip(images, captions, strict=True):
            by_image.setdefault(image, []).append(caption)
        entries = []
        for e in data["images"]:
            rel = str(Path(e.get("filepath", "")) / e["filename"]) if isinstance(e, dict) and "filename" in e else None
            if rel in by_image:
                sentences = [{"raw": c, "tokens": c.split()} for c in by_image[rel]]
                entries.append({**e, "sentences": sentences})
        body = {**data, "images": entries}
    else:  # "list" and "folder": [{"image", "caption"}], one entry per pair
        body = [{"image": image, "caption": caption} for image, caption in zip(images, captions, strict=True)]
    text = json.dumps(body, ensure_ascii=False) + "\n"
    _atomic_write(out / "annotations.json", lambda p: p.write_text(text, encoding="utf-8"))
    return "annotations.json"


# --------------------------------------------------------------------------------------------------- the job


class _ItemList:
    """The job's items, iterable again and countable (for the progress bar's total)."""

    def __init__(self, items: list[Item]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def count(self) -> int:
        return len(self.items)


@dataclass
class CapFiltResult:
    """What `capfilt` did: the engine's summary and the output counts (see `write_outputs`)."""

    summary: Summary
    counts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return self.summary.to_dict()


def _load(model: BlipBase | str, device: str | None, dtype: str | None) -> BlipBase:
    import blipkit

    return model if isinstance(model, BlipBase) else blipkit.load(model, device=device, dtype=dtype)


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse an output directory made with other models or decoding (its scores would mix two filters)."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{path} is not a capfilt settings file: pass an empty or earlier capfilt --out") from None
    fixed = ("captioner", "captioner_fingerprint", "filter", "filter_fingerprint", "samples", "decoding", "top_p",
             "min_new_tokens", "max_new_tokens", "num_beams", "seed", "seeding")
    diff = [k for k in fixed if stored.get(k) != settings.get(k)]
    if diff:
        k = diff[0]
        raise InputError(f"'{out}' holds capfilt results made with {k}={stored.get(k)!r}, not {settings.get(k)!r}: "
                         "pass another --out (or the same settings to resume)")


def capfilt(
    annotations: str | Path | Annotations,
    out: str | Path,
    captioner: BlipBase | str = "scenes-blip",
    filter: BlipBase | str | None = None,
    samples: int = 1,
    threshold: float = 0.5,
    decoding: str = "nucleus",
    top_p: float = 0.9,
    min_new_tokens: int = 5,
    max_new_tokens: int = 30,
    num_beams: int = 3,
    seed: int = 0,
    batch_size: int = 32,
    workers: int | None = None,
    commit_seconds: float | None = None,
    executor: str = "local",
    ray: RayOptions | None = None,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> CapFiltResult:
    """Caption and filter a captioned dataset (CapFilt); resumable. See the module docstring for what is written.

    Args:
        annotations: a JSON list of `{"image", "caption"}`, a Karpathy JSON, a Parquet table or a folder with
            sidecar captions (or what `read_annotations` returned).
        out: the output directory (rerun with the same one to resume).
        captioner, filter: models (names, directories or loaded); the filter defaults to the captioner.
        samples: synthetic captions per image (0: filter the web captions only).
        threshold: the ITM match probability a caption needs to be kept.
        decoding: "nucleus" (sampling with `top_p`) or "beam" (the best `samples` of `num_beams` beams).
        workers, commit_seconds: the local executor's decoding processes, and how far apart batches are written
            (default 1 s; 0: every batch; see `engine.run_job`).
        executor: "local", or "ray": the same job on Ray Data (`ray`: address, actors, GPUs, rows per commit; see
            `ray_executor`); the models are loaded here and shipped to the actors.
    """
    if executor not in ("local", "ray"):
        raise InputError(f"executor={executor!r}: use local or ray")
    if executor == "ray":
        from .ray_executor import refuse_local_options

        refuse_local_options(workers=workers, commit_seconds=commit_seconds)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise InputError(f"threshold={threshold!r}: give a probability between 0 and 1")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p={top_p!r}: give a probability in (0, 1]")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file: pass a directory")
    ann = annotations if isinstance(annotations, Annotations) else read_annotations(annotations, image_root, skip_bad)
    cap = _load(captioner, device, dtype)
    filt = cap if filter is None or filter == captioner else _load(filter, device, dtype)
    items, index_of = [], {}
    for i, (file, caps) in enumerate(zip(ann.files, ann.captions, strict=True)):
        item = file_item(file)
        digest = hashlib.blake2b("\n".join(caps).encode(), digest_size=8).hexdigest()
        # new web captions for an image: a new item; they travel with it (as JSON) to the step
        item = replace(item, key=f"{item.key}|{digest}", text=json.dumps(caps, ensure_ascii=False))
        if item.key in index_of:
            continue
        items.append(item)
        index_of[item.key] = i
    options = dict(samples=samples, decoding=decoding, top_p=top_p, min_new_tokens=min_new_tokens,
                   max_new_tokens=max_new_tokens, num_beams=num_beams, seed=seed)
    step = CapFiltStep(cap, filt, **options)  # the options checked before any output is written
    settings = {"captioner": str(cap.name_or_path),
                "captioner_fingerprint": model_fingerprint(cap) if samples else None,
                "filter": str(filt.name_or_path), "filter_fingerprint": model_fingerprint(filt), "samples": samples,
                "decoding": decoding, "top_p": top_p if decoding == "nucleus" else None,
                "min_new_tokens": min_new_tokens, "max_new_tokens": max_new_tokens,
                "num_beams": num_beams if decoding == "beam" else None, "seed": seed,
                # sampled captions draw from one generator per image (seed + key); a directory written when the
                # samples were seeded per batch has no such entry and is refused rather than mixed
                "seeding": "per-image" if samples and decoding == "nucleus" else None}
    _check_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps({"settings": settings, "annotations": str(ann.source)}, indent=1))
    writer = CapFiltWriter(out, ann, index_of, threshold)
    if executor == "ray":
        from .ray_executor import ModelStep, run_job_ray

        recipe = ModelStep(CapFiltStep, cap, dict(filter=filt, **options))  # filt is cap when they are one model
        summary = run_job_ray(_ItemList(items), recipe, writer, step.processor, batch_size, ray, progress=progress,
                              desc="capfilt")
    else:
        summary = run_job(_ItemList(items), step, writer, batch_size=batch_size, workers=workers, progress=progress,
                          desc="capfilt", commit_seconds=COMMIT_SECONDS if commit_seconds is None else commit_seconds)
    record = {"settings": {**settings, "threshold": threshold}, "annotations": str(ann.source),
              "skipped_entries": ann.skipped, "counts": summary.extra}
    (out / SETTINGS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return CapFiltResult(summary, summary.extra)
