"""Decoding and preprocessing of items, in worker processes: bytes -> upright RGB -> the model's pixels.

Everything a bad file can do ends here as a `Failure` with a reason (zero bytes, not an image, truncated, a
decompression bomb, unreadable), so one bad item never stops a job. Decompression bombs are refused from
`max_pixels` on (Pillow's warning level is raised to an error, so no image larger than that is ever decoded).

Worker processes decode with `raw=True`: the resized image stays uint8 (a quarter of the float32 bytes to pickle
and send back), and `normalise` maps the batch to the model's float pixels in the receiving process, with the
processor's own per-level table (so the values are exactly the processor's).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..processing import ImageProcessor, load_image
from .readers import Item

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own limit (about 0.25 GB of 24-bit pixels)


@dataclass(frozen=True)
class Decoded:
    """An item decoded: its preprocessed pixels (3, H, W) float32 (uint8 before `normalise` when decoded raw) and
    the image's upright width and height."""

    item: Item
    pixels: np.ndarray
    width: int
    height: int


@dataclass(frozen=True)
class Failure:
    """An item that could not be used, with the reason recorded for it."""

    item: Item
    reason: str


def decode(item: Item, processor: ImageProcessor, max_pixels: int = DEFAULT_MAX_PIXELS, raw: bool = False
           ) -> Decoded | Failure:
    """Read, decode and preprocess one item; every way it can fail becomes a Failure with the reason.

    With `raw`, the pixels are the resized uint8 image (3, H, W), to be finished by `normalise`.
    """
    if item.error is not None:
        return Failure(item, item.error)
    try:
        data = item.read_bytes()
    except OSError as e:
        return Failure(item, f"unreadable: {e.strerror or e}")
    if not data:
        return Failure(item, "empty file (0 bytes)")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels  # Pillow warns above it: an error here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()  # decode fully now: a truncated file fails here
                image = load_image(opened)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        return Failure(item, f"decompression bomb: {e}")
    except Image.UnidentifiedImageError:
        return Failure(item, "not an image Pillow can read")
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, struct.error ...) on bad data
        return Failure(item, f"cannot decode: {_reason(e)}")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        pixels = _resized(processor, image) if raw else processor(image)[0].numpy()
    except Exception as e:  # e.g. an image too small to resize
        return Failure(item, f"cannot preprocess: {_reason(e)}")
    return Decoded(item, pixels, image.width, image.height)


def _reason(e: BaseException) -> str:
    """One line: the innermost cause of an error (load_image wraps Pillow's in an InputError)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{type(e).__name__}: {text}"


def decode_batch(items: list[Item], processor: ImageProcessor, max_pixels: int = DEFAULT_MAX_PIXELS,
                 raw: bool = False) -> list[Decoded | Failure]:
    """`decode` over a batch: what a worker process runs."""
    return [decode(item, processor, max_pixels, raw) for item in items]


def _resized(processor: ImageProcessor, image: Image.Image) -> np.ndarray:
    """The image resized as the processor resizes it, uint8 (3, H, W): its float pixels are `normalise`'s."""
    height, width = processor.size
    return np.ascontiguousarray(np.asarray(image.resize((width, height), resample=processor.resample))
                                .transpose(2, 0, 1))


def normalise(results: list[Decoded | Failure], processor: ImageProcessor) -> list[Decoded | Failure]:
    """Raw (uint8) decoded items -> float32 pixels, a whole batch at once, through the processor's per-level table
    (so the values are the processor's, exactly).

    The pixels of the batch's good items are rows of one (n, 3, H, W) array, which `engine.pixels` takes as it is.
    """
    ok = [i for i, r in enumerate(results) if isinstance(r, Decoded)]
    if not ok:
        return results
    table = processor._lut.reshape(-1)  # (3 * 256,) float32: channel c, level v at c * 256 + v (ImageProcessor)
    chw = np.stack([results[i].pixels for i in ok]).astype(np.uint16)  # (n, 3, H, W)
    chw += (np.arange(3, dtype=np.uint16) * 256)[None, :, None, None]
    values = table[chw]  # (n, 3, H, W) float32
    out = list(results)
    for j, i in enumerate(ok):
        r = results[i]
        out[i] = Decoded(r.item, values[j], r.width, r.height)
    return out
