"""Datasets of captioned images (and question-answer pairs) from the formats real data comes in.

Sources, each read into a list of `Item`s (or streamed):
- a scenes dataset directory (`dataset.json` manifest, see `blipkit.data.scenes`), captions + VQA of one split;
- COCO / Flickr Karpathy JSON: the BLIP/LAVIS layout (`[{"image", "caption": str | [str]}]`, entries of one image
  merged) or the original `dataset_coco.json` (`{"images": [{"filepath", "filename", "split", "sentences"}]}`);
- a folder of images with captions: `name.txt` next to `name.jpg` (one caption a line) or a `metadata.jsonl` of
  `{"file_name", "text"}` lines;
- webdataset tar shards (`shards-{000..009}.tar`, a glob, or a list), streamed: members `KEY.jpg|png|webp` with
  `KEY.txt` (captions) and/or `KEY.json` (`caption`/`captions`, `question`, `answer`).
VQA annotations (`[{"image", "question", "answer": str | [str]}]`) attach to the items of the same image.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import InputError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Item:
    """One image with its captions and question-answer pairs (each with its accepted answers)."""

    image: Path | bytes
    key: str
    captions: list[str] = field(default_factory=list)
    qa: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class Loaded:
    """Items read from a source, and how many bad entries were skipped (with `skip_bad`)."""

    items: list[Item]
    skipped: int = 0
    source: str = ""


# --------------------------------------------------------------------------------------------------- readers


class _Checker:
    """Raises InputError naming the entry, or counts it when skipping bad entries."""

    def __init__(self, source: str, skip_bad: bool):
        self.source, self.skip_bad, self.skipped = source, skip_bad, 0

    def bad(self, where: str, why: str) -> None:
        if not self.skip_bad:
            raise InputError(f"{self.source}: {where}: {why} (fix the entry, or pass --skip-bad to skip such entries)")
        self.skipped += 1


def image_problem(file: Path, thorough: bool = False) -> str | None:
    """Why an image file cannot be used (missing, empty, not an image; with `thorough`, also cut short or otherwise
    undecodable), or None. Opening reads only the header; `thorough` decodes the whole image."""
    if not file.is_file():
        return f"image file {file} does not exist"
    if file.stat().st_size == 0:
        return f"image file {file} is empty"
    try:
        with Image.open(file) as image:
            if thorough:
                image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        return f"image file {file} cannot be read ({' '.join(str(e).split())})"
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({e})") from None


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def _as_texts(value: object) -> list[str] | None:
    """A string or a list of strings -> list of non-blank strings; None when the value is neither."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return [v for v in value if v.strip()]


def _image_root(path: Path, first: str | None, image_root: str | Path | None) -> Path:
    """The directory image paths are relative to: given, else the JSON's folder or its parent, where they exist."""
    if image_root is not None:
        return Path(image_root)
    for root in (path.parent, path.parent.parent):
        if first is not None and (root / first).exists():
            return root
    return path.parent


def read_karpathy(
    path: str | Path, image_root: str | Path | None = None, split: str | None = None, skip_bad: bool = False
) -> Loaded:
    """Captions of a Karpathy-style JSON (BLIP/LAVIS layout or the original `dataset_*.json`)."""
    path = Path(path)
    data = _read_json(path)
    check = _Checker(str(path), skip_bad)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        rows = []
        for i, e in enumerate(data["images"]):
            if not isinstance(e, dict) or "filename" not in e or "sentences" not in e:
                check.bad(f"images[{i}]", "needs 'filename' and 'sentences'")
                continue
            if split is not None and e.get("split", "train") != split and not (
                split == "train" and e.get("split") == "restval"
            ):
                continue
            caps = [s.get("raw", " ".join(s.get("tokens", []))) for s in e["sentences"] if isinstance(s, dict)]
            rel = str(Path(e.get("filepath", "")) / e["filename"])
            rows.append((f"images[{i}]", rel, caps))
    elif isinstance(data, list):
        rows = []
        for i, e in enumerate(data):
            caps = _as_texts(e.get("caption")) if isinstance(e, dict) else None
            if not isinstance(e, dict) or not isinstance(e.get("image"), str) or caps is None:
                check.bad(f"entry {i}", "needs 'image' (a path) and 'caption' (a string or a list of strings)")
                continue
            rows.append((f"entry {i} ({e['image']})", e["image"], caps))
    else:
        raise InputError(f"{path}: expected a list of {{'image', 'caption'}} entries or {{'images': [...]}}")
    root = _image_root(path, rows[0][1] if rows else None, image_root)
    items: dict[str, Item] = {}
    for where, rel, caps in rows:
        file = root / rel
        if not caps:
            check.bad(where, "has no caption")
            continue
        problem = None if rel in items else image_problem(file, skip_bad)
        if problem:
            check.bad(where, problem)
            continue
        items.setdefault(rel, Item(file, rel)).captions.extend(caps)
    return Loaded(list(items.values()), check.skipped, str(path))


def read_vqa(
    path: str | Path, image_root: str | Path | None = None, skip_bad: bool = False
) -> tuple[dict[str, list[tuple[str, list[str]]]], int]:
    """VQA annotations -> {image path as written: [(question, answers)]}, and the number of bad entries skipped."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of {{'image', 'question', 'answer'}} entries")
    check = _Checker(str(path), skip_bad)
    out: dict[str, list[tuple[str, list[str]]]] = {}
    for i, e in enumerate(data):
        answers = _as_texts(e.get("answer")) if isinstance(e, dict) else None
        ok = isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("question"), str)
        if not ok or not answers or not e["question"].strip():
            check.bad(f"entry {i}", "needs 'image', 'question' and 'answer' (a string or a non-empty list)")
            continue
        out.setdefault(e["image"], []).append((e["question"], answers))
    return out, check.skipped


def read_folder(path: str | Path, skip_bad: bool = False) -> Loaded:
    """Images of a folder (recursively) with captions from `metadata.jsonl` or `.txt` files of the same name."""
    root = Path(path)
    check = _Checker(str(root), skip_bad)
    items = []
    meta = root / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(_read_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except ValueError:
                check.bad(f"metadata.jsonl line {n}", "not valid JSON")
                continue
            caps = _as_texts(e.get("text", e.get("caption"))) if isinstance(e, dict) else None
            if not isinstance(e, dict) or not isinstance(e.get("file_name"), str) or not caps:
                check.bad(f"metadata.jsonl line {n}", "needs 'file_name' and 'text'")
            elif problem := image_problem(root / e["file_name"], skip_bad):
                check.bad(f"metadata.jsonl line {n}", problem)
            else:
                items.append(Item(root / e["file_name"], e["file_name"], caps))
        return Loaded(items, check.skipped, str(root))
    for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = file.with_suffix(".txt")
        caps = _as_texts(_read_text(txt).splitlines()) if txt.is_file() else []
        if not caps:
            check.bad(str(file.relative_to(root)), f"no captions ({txt.name} is missing or empty)")
            continue
        if problem := image_problem(file, skip_bad):
            check.bad(str(file.relative_to(root)), problem)
            continue
        items.append(Item(file, str(file.relative_to(root)), caps))
    if not items and not check.skipped:
        raise InputError(f"{root}: no images with captions (expected name.jpg + name.txt, or metadata.jsonl)")
    return Loaded(items, check.skipped, str(root))


def read_scenes(root: str | Path, split: str, skip_bad: bool = False, vqa: bool = True) -> Loaded:
    """One split of a scenes dataset directory (captions, and VQA pairs when `vqa`)."""
    root = Path(root)
    manifest = _read_json(root / "dataset.json")
    splits = manifest.get("splits", {}) if isinstance(manifest, dict) else {}
    if split not in splits:
        raise InputError(f"{root / 'dataset.json'}: no split '{split}' (has {', '.join(splits) or 'none'})")
    info = splits[split]
    loaded = read_karpathy(root / info["captions"], image_root=root, skip_bad=skip_bad)
    if vqa and info.get("vqa"):
        qa, skipped = read_vqa(root / info["vqa"], skip_bad=skip_bad)
        attach_vqa(loaded.items, qa)
        loaded.skipped += skipped
    return loaded


def captions_only(items: list[Item]) -> list[Item]:
    """The items that have captions, without their question-answer pairs (what BLIP-2 and its language model read)."""
    kept = [Item(it.image, it.key, list(it.captions)) for it in items if it.captions]
    if not kept:
        raise InputError("no item has a caption: BLIP-2 and language-model training learn from captions")
    return kept


def attach_vqa(items: list[Item], qa: dict[str, list[tuple[str, list[str]]]]) -> int:
    """Give each item the question-answer pairs of its image; returns how many pairs found an item."""
    n = 0
    for item in items:
        pairs = qa.get(item.key) or qa.get(str(item.image)) or []
        item.qa.extend(pairs)
        n += len(pairs)
    return n


def load_items(
    data: str | Path,
    split: str = "train",
    image_root: str | Path | None = None,
    vqa: str | Path | None = None,
    skip_bad: bool = False,
) -> Loaded:
    """Read a map-style source: scenes directory, Karpathy JSON or image folder (plus an optional VQA JSON)."""
    path = Path(data)
    if path.is_dir() and (path / "dataset.json").is_file():
        loaded = read_scenes(path, split, skip_bad)
    elif path.is_dir():
        loaded = read_folder(path, skip_bad)
    elif path.suffix == ".json":
        loaded = read_karpathy(path, image_root, split, skip_bad)
    else:
        raise InputError(f"{data}: not a dataset directory, Karpathy JSON, image folder or tar shards")
    if vqa is not None:
        qa, skipped = read_vqa(vqa, image_root, skip_bad)
        if attach_vqa(loaded.items, qa) == 0:
            raise InputError(f"{vqa}: none of its images is in {data}; VQA entries attach to images by path")
        loaded.skipped += skipped
    if not loaded.items:
        raise InputError(f"{data}: no usable entries (skipped {loaded.skipped} bad ones)")
    return loaded


def expand_shards(spec: str | list[str]) -> list[str]:
    """`a-{000..009}.tar` brace ranges, globs, comma-separated lists -> sorted list of shard paths."""
    parts = spec if isinstance(spec, list) else spec.split(",")
    out: list[str] = []
    for part in parts:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            out += [part[: m.start()] + str(i).zfill(width) + part[m.end() :] for i in range(lo, hi + 1)]
        elif any(c in part for c in "*?["):
            out += sorted(glob.glob(part))
        else:
            out.append(part)
    missing = [p for p in out if not Path(p).is_file()]
    if not out or missing:
        raise InputError(f"tar shards '{spec}': {'missing ' + ', '.join(missing[:3]) if missing else 'none found'}")
    return out


def iter_tar_items(shard: str, skip_bad: bool = False) -> Iterator[Item]:
    """Items of one webdataset tar shard, in file order (members grouped by the key before the first dot)."""

    def finish(key: str, files: dict[str, bytes]) -> Item | None:
        image = next((files[e] for e in IMAGE_EXTS if e in files), None)
        caps, qa = [], []
        if ".txt" in files:
            caps = _as_texts(files[".txt"].decode("utf-8").splitlines()) or []
        if ".json" in files:
            try:
                meta = json.loads(files[".json"])
            except ValueError:
                meta = {}
            caps += _as_texts(meta.get("captions", meta.get("caption", []))) or []
            answers = _as_texts(meta.get("answer", meta.get("answers")))
            if isinstance(meta.get("question"), str) and answers:
                qa.append((meta["question"], answers))
        if image is None or not (caps or qa):
            if not skip_bad:
                raise InputError(f"{shard}: sample '{key}' lacks an image or captions/question (or pass --skip-bad)")
            return None
        return Item(image, f"{shard}:{key}", caps, qa)

    key, files = None, {}
    with tarfile.open(shard, "r|*") as tar:  # streamed: members are read in order, never all at once
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name)
            base, _, ext = name.name.partition(".")
            k = str(name.parent / base)
            if k != key and key is not None:
                item = finish(key, files)
                if item is not None:
                    yield item
                files = {}
            key = k
            files["." + ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        item = finish(key, files)
        if item is not None:
            yield item


def is_shards(data: str | Path) -> bool:
    """Whether `data` names tar shards (a .tar path, pattern or list)."""
    return ".tar" in str(data)
