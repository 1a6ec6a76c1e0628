"""Training samples and batches over the datasets of `blipkit.data.readers`.

Batches are deterministic functions of (seed, step): epoch `e` visits a seeded permutation, item `i` of it draws its
caption and question with a generator seeded by (seed, e, i). Resuming at step `s` therefore reproduces exactly the
batches an uninterrupted run would have seen, without reading the skipped images.
"""

from __future__ import annotations

import io
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from ..data.readers import Item, iter_tar_items
from ..errors import InputError
from ..processing import ImageProcessor, Tokenizer, load_image

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
