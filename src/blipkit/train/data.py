"""Training data: captioned images (and question-answer pairs) from the formats real data comes in.

Sources, each read into a list of `Item`s (or streamed):
- a scenes dataset directory (`dataset.json` manifest, see `blipkit.data.scenes`), captions + VQA of one split;
- COCO / Flickr Karpathy JSON: the BLIP/LAVIS layout (`[{"image", "caption": str | [str]}]`, entries of one image
  merged) or the original `dataset_coco.json` (`{"images": [{"filepath", "filename", "split", "sentences"}]}`);
- a folder of images with captions: `name.txt` next to `name.jpg` (one caption a line) or a `metadata.jsonl` of
  `{"file_name", "text"}` lines;
- webdataset tar shards (`shards-{000..009}.tar`, a glob, or a list), streamed: members `KEY.jpg|png|webp` with
  `KEY.txt` (captions) and/or `KEY.json` (`caption`/`captions`, `question`, `answer`).
VQA annotations (`[{"image", "question", "answer": str | [str]}]`) attach to the items of the same image.

Batches are deterministic functions of (seed, step): epoch `e` visits a seeded permutation, item `i` of it draws its
caption and question with a generator seeded by (seed, e, i). Resuming at step `s` therefore reproduces exactly the
batches an uninterrupted run would have seen, without reading the skipped images.
"""

from __future__ import annotations

import glob
import io
import json
import random
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..errors import InputError
from ..processing import ImageProcessor, Tokenizer, load_image

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
        if rel not in items and not file.is_file():
            check.bad(where, f"image file {file} does not exist")
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
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
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
            elif not (root / e["file_name"]).is_file():
                check.bad(f"metadata.jsonl line {n}", f"image file {root / e['file_name']} does not exist")
            else:
                items.append(Item(root / e["file_name"], e["file_name"], caps))
        return Loaded(items, check.skipped, str(root))
    for file in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = file.with_suffix(".txt")
        caps = _as_texts(txt.read_text(encoding="utf-8").splitlines()) if txt.is_file() else []
        if not caps:
            check.bad(str(file.relative_to(root)), f"no captions ({txt.name} is missing or empty)")
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


# --------------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """What one training example holds before tokenisation."""

    pixels: torch.Tensor | None  # (3, H, W); None for text-only training (no image processor)
    image_key: int  # equal for equal images (ITC positives)
    caption: str | None
    question: str | None
    answer: str | None
    lm_caption: str | None = None  # the caption the decoder learns from (None: `caption`)
    seed: int = 0  # for choices a batch function makes per sample (e.g. where a caption is split)


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def make_sample(
    item: Item, processor: ImageProcessor | None, rng: random.Random, lm_filter: re.Pattern | None = None
) -> Sample:
    """Preprocess the image and draw one caption and one question-answer pair (with one of its answers).

    With `lm_filter`, the captioning target is drawn separately among the captions the pattern matches (when the
    image has any), so the decoder learns to describe rather than, say, to count. Without a `processor` the image
    is not read (text-only training).
    """
    pixels = None
    if processor is not None:
        image = Image.open(io.BytesIO(item.image)) if isinstance(item.image, bytes) else item.image
        pixels = processor(load_image(image))[0]
    caption = rng.choice(item.captions) if item.captions else None
    question = answer = None
    if item.qa:
        question, answers = rng.choice(item.qa)
        answer = rng.choice(answers)
    lm_caption = None
    if lm_filter is not None:
        chosen = [c for c in item.captions if lm_filter.search(c)]
        lm_caption = rng.choice(chosen) if chosen else None
    return Sample(pixels, _key(item.key), caption, question, answer, lm_caption, rng.getrandbits(32))


class Collate:
    """Samples -> a batch of tensors; captions and questions are tokenised, rows without them are indexed out."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def _texts(self, texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        rows = [i for i, t in enumerate(texts) if t]
        if not rows:
            return None
        ids, mask = self.tokenizer([texts[i] for i in rows], max_length=self.max_length)
        return torch.tensor(rows), ids, mask

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {
            "pixels": torch.stack([s.pixels for s in samples]),
            "image_keys": torch.tensor([s.image_key for s in samples]),
        }
        caps = self._texts([s.caption for s in samples])
        if caps is not None:
            batch["caption_rows"], batch["caption_ids"], batch["caption_mask"] = caps
            batch["caption_keys"] = torch.tensor([_key(samples[i].caption) for i in caps[0].tolist()])
        if any(s.lm_caption for s in samples):
            lm = self._texts([s.lm_caption or s.caption for s in samples])
            batch["lm_rows"], batch["lm_ids"], batch["lm_mask"] = lm
        qs = self._texts([s.question for s in samples])
        if qs is not None:
            batch["qa_rows"], batch["question_ids"], batch["question_mask"] = qs
            _, batch["answer_ids"], batch["answer_mask"] = self._texts([samples[i].answer for i in qs[0].tolist()])
        return batch


# --------------------------------------------------------------------------------------------------- batching


def _item_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{epoch}:{index}")


class ItemDataset(torch.utils.data.Dataset):
    """Map-style dataset over `(epoch, index)` pairs, so worker processes draw the same captions as the main one."""

    def __init__(self, items: list[Item], processor: ImageProcessor | None, seed: int, lm_filter: str | None = None):
        self.items, self.processor, self.seed = items, processor, seed
        self.lm_filter = re.compile(lm_filter) if lm_filter else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        epoch, index = key
        return make_sample(self.items[index], self.processor, _item_rng(self.seed, epoch, index), self.lm_filter)


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of `(epoch, index)` from step `start` on: epoch e is a seeded permutation, cut into global batches of
    `batch_size * world`; this rank takes every `world`-th element of each."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.start, self.rank, self.world = n, batch_size, seed, start, rank, world
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise InputError(f"{n} items cannot fill one batch of {batch_size} x {world} process(es): "
                             "lower --batch-size")

    def __len__(self) -> int:
        return 2**62  # endless: the training loop decides when to stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            epoch, pos = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            glob_bs = self.batch_size * self.world
            chunk = perm[pos * glob_bs : (pos + 1) * glob_bs][self.rank :: self.world]
            yield [(epoch, int(i)) for i in chunk]
            step += 1


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


class ShardStream:
    """Endless stream of samples from tar shards: this rank's shards in a seeded order per epoch, a seeded shuffle
    buffer, and a resumable position (the number of samples this rank has taken)."""

    def __init__(self, shards: list[str], processor: ImageProcessor | None, seed: int, rank: int = 0, world: int = 1,
                 buffer: int = 256, skip_bad: bool = False, lm_filter: str | None = None):
        self.shards = shards[rank::world] if len(shards) >= world else shards
        self.processor, self.seed, self.rank, self.buffer, self.skip_bad = processor, seed, rank, buffer, skip_bad
        self.lm_filter = re.compile(lm_filter) if lm_filter else None

    def items(self) -> Iterator[tuple[int, int, Item]]:
        """(epoch, position in epoch, item) forever, shuffled through the buffer."""
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}:{self.rank}:{epoch}")
            order = list(self.shards)
            rng.shuffle(order)
            buf: list[Item] = []
            pos = 0
            for shard in order:
                for item in iter_tar_items(shard, self.skip_bad):
                    buf.append(item)
                    if len(buf) >= self.buffer:
                        yield epoch, pos, buf.pop(rng.randrange(len(buf)))
                        pos += 1
            rng.shuffle(buf)
            for item in buf:
                yield epoch, pos, item
                pos += 1
            if pos == 0:
                raise InputError(f"tar shards {self.shards[:3]}: no usable samples")
            epoch += 1

    def samples(self, start: int = 0) -> Iterator[Sample]:
        """Samples from position `start` on (skipped samples are read but not decoded)."""
        for n, (epoch, pos, item) in enumerate(self.items()):
            if n >= start:
                yield make_sample(item, self.processor, _item_rng(self.seed, epoch, pos), self.lm_filter)


def stream_batches(stream: ShardStream, collate: Collate, batch_size: int, start_step: int) -> Iterator[dict]:
    """Collated batches of a shard stream, starting at training step `start_step`."""
    samples = stream.samples(start_step * batch_size)
    while True:
        yield collate([next(samples) for _ in range(batch_size)])


def is_shards(data: str | Path) -> bool:
    """Whether `data` names tar shards (a .tar path, pattern or list)."""
    return ".tar" in str(data)
