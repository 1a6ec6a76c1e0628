"""Decoding and preprocessing of items, in worker processes: bytes -> upright RGB -> the model's pixels.

Everything a bad file can do ends here as a `Failure` with a reason (zero bytes, not an image, truncated, a
decompression bomb, unreadable), so one bad item never stops a job. Decompression bombs are refused from
`max_pixels` on (Pillow's warning level is raised to an error, so no image larger than that is ever decoded).
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
    """An item decoded: its preprocessed pixels (3, H, W) float32 and the image's upright width and height."""

    item: Item
    pixels: np.ndarray
    width: int
    height: int


@dataclass(frozen=True)
class Failure:
    """An item that could not be used, with the reason recorded for it."""

    item: Item
    reason: str


def decode(item: Item, processor: ImageProcessor, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded | Failure:
    """Read, decode and preprocess one item; every way it can fail becomes a Failure with the reason."""
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
        pixels = processor(image)[0].numpy()
    except Exception as e:  # e.g. an image too small to resize
        return Failure(item, f"cannot preprocess: {_reason(e)}")
    return Decoded(item, pixels, image.width, image.height)


def _reason(e: BaseException) -> str:
    """One line: the innermost cause of an error (load_image wraps Pillow's in an InputError)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{type(e).__name__}: {text}"


def decode_batch(items: list[Item], processor: ImageProcessor, max_pixels: int = DEFAULT_MAX_PIXELS
                 ) -> list[Decoded | Failure]:
    """`decode` over a batch: what a worker process runs."""
    return [decode(item, processor, max_pixels) for item in items]
