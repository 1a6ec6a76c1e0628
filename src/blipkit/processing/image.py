"""Image preprocessing equal to the transformers BLIP image processor: load, convert to RGB, resize, normalise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from ..errors import CheckpointError, InputError
from ..fields import BOOL, MAX_IMAGE_SIZE, Float, Int, Rule, check, fail

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Normalised pixels lie within a few units of 0 (CLIP's mean / std map 0..255 to about -1.8..2.2); a tensor beyond
# this is not normalised pixels, and its values would overflow the model (to inf / NaN) rather than give an answer.
MAX_PIXEL = 1000.0
ImageLike = str | Path | Image.Image | torch.Tensor


def _to_rgb(image: Image.Image, name: str = "the PIL image") -> Image.Image:
    """Convert any mode to RGB as transformers' `convert_to_rgb` does: transparency is composited onto white.

    Policy for images of more than 8 bits, where PIL's own conversion clips every value above 255 (a 16-bit image
    turns almost all white): 16-bit modes (`I;16*`) are scaled to 8 bits (v / 257, rounded); 32-bit integer (`I`)
    and float (`F`) images have no fixed scale and are refused.
    """
    if image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise InputError(f"{name} has mode {image.mode!r} ({kind} pixels), whose brightness scale is unknown: "
                         "convert it to an 8-bit image (mode 'L' or 'RGB') first")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if image.mode == "RGB":
        return image  # the reference's convert("RGB") would only copy it
    return image.convert("RGB")  # L, P, CMYK, 1, LA, ...: PIL's own conversion, as the reference


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """Open a path or take a PIL image; apply its EXIF orientation and return it in RGB.

    Files of more than `PIL.Image.MAX_IMAGE_PIXELS` pixels (a decompression-bomb guard) are refused before decoding.
    """
    name = "the PIL image" if isinstance(image, Image.Image) else f"image file '{image}'"
    try:
        if isinstance(image, Image.Image):  # never modified: transposing and converting make new images
            _check_size(image, name)
            upright = image.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1)
            return _to_rgb(image if upright else ImageOps.exif_transpose(image), name)
        with Image.open(image) as opened:
            _check_size(opened, name)
            opened.load()  # decode now, so truncated files fail here and not later
            ImageOps.exif_transpose(opened, in_place=True)
            return _to_rgb(opened, name)
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"{name} does not exist: check the path") from e
    except Image.DecompressionBombError as e:
        raise InputError(f"{name} is too large to decode ({e}): pass a smaller image") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as e:
        raise InputError(f"cannot read {name} ({e}): pass a complete image file that Pillow can open") from e


def _check_size(image: Image.Image, name: str) -> None:
    """Refuse an opened, not yet decoded, image without pixels or with more than Pillow's decompression-bomb limit."""
    limit, (w, h) = Image.MAX_IMAGE_PIXELS, image.size
    if w * h == 0:
        raise InputError(f"{name} is {w}x{h} pixels, an empty image: pass an image with pixels")
    if limit is not None and w * h > limit:
        raise InputError(f"{name} is {w}x{h} = {w * h} pixels, more than the {limit} allowed "
                         "(PIL.Image.MAX_IMAGE_PIXELS, a decompression-bomb guard): pass a smaller image")


def check_pixels(tensor: torch.Tensor, size: tuple[int, int], name: str = "the image tensor") -> torch.Tensor:
    """A preprocessed image tensor (3, H, W) or (N, 3, H, W) -> (N, 3, H, W), checked: float, finite, `size`.

    Integer and bool tensors are refused, not converted: a uint8 (3, H, W) tensor could be raw 0-255 pixels in
    either RGB or BGR order, of any size, so it is not taken for normalised pixels.
    """
    shape = tuple(tensor.shape)
    if not tensor.is_floating_point():
        raise InputError(f"{name} has dtype {tensor.dtype}: a tensor is taken only as normalised float pixels; pass "
                         "raw images as a path or a PIL image (or preprocess them with model.processor)")
    batch = tensor.unsqueeze(0) if tensor.dim() == 3 else tensor
    if batch.dim() != 4 or tuple(batch.shape[1:]) != (3, *size) or not batch.shape[0]:
        raise InputError(f"{name} has shape {shape}; preprocessed pixels are (3, {size[0]}, {size[1]}) or "
                         f"(N, 3, {size[0]}, {size[1]}) with N >= 1: pass a path or PIL image instead")
    if not bool(torch.isfinite(batch).all()):
        raise InputError(f"{name} contains NaN or infinite values: pass finite normalised pixels")
    largest = float(batch.abs().amax())
    if largest > MAX_PIXEL:
        raise InputError(f"{name} holds pixel values up to {largest:.3g}, not normalised pixels (those lie within a "
                         f"few units of 0; at most {MAX_PIXEL:g} is taken): pass a path or PIL image, or normalise "
                         "with model.processor")
    return batch


def _numbers(rule: Rule, count: int) -> Callable[[Any], str | None]:
    """A check for a list of `count` numbers, each obeying `rule`."""

    def problem(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or len(value) != count:
            return f"not a list of {count} numbers"
        return next((f"whose item {i} is {p}" for i, p in enumerate(map(rule.problem, value)) if p is not None), None)

    return problem


# What each setting may be; the size is (height, width) by then.
_PROBLEMS: dict[str, Callable[[Any], str | None]] = {
    "size": _numbers(Int(1, MAX_IMAGE_SIZE), 2),
    "mean": _numbers(Float(), 3),
    "std": _numbers(Float(0.0, lo_open=True), 3),
    "resample": Rule(int, choices=tuple(int(f) for f in Image.Resampling)).problem,
    "rescale_factor": Float(0.0, lo_open=True).problem,
}


@dataclass(frozen=True)
class ImageProcessor:
    """Resize (PIL, bicubic) → rescale 1/255 → normalise, bit-identical to transformers' `BlipImageProcessorPil`.

    The pipeline is the reference's, step for step: RGB conversion, PIL resize of the uint8 image, `x.astype(float64) *
    1/255` cast to float32, then `(x - mean) / std` in float32. Because the resized image is uint8, the last two steps
    are a 256-entry lookup table per channel, computed once with the same float operations (exact, and fast).
    transformers' default `BlipImageProcessor` (torchvision backend) resizes uint8 tensors with torch's antialiased
    bicubic kernel instead of PIL's; measured on photo-like images resized to 384² and 224², it differs from this
    path by one or two uint8 levels on 0.1–0.5% of values (max abs difference 0.015–0.030 after normalisation, mean
    ≈ 5e-5), and by ≤ 1e-6 (float rounding of its fused normalisation) when no resize is needed.
    Unlike transformers, EXIF orientation is applied (see `load_image`).
    """

    size: int | tuple[int, int] = 384
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, list):
            size = tuple(size)
        elif isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        object.__setattr__(self, "size", size)
        for name, value in (("size", size), ("mean", self.mean), ("std", self.std), ("resample", self.resample),
                            ("rescale_factor", self.rescale_factor)):
            problem = _PROBLEMS[name](value)
            if problem is not None:
                raise InputError(f"ImageProcessor got {name}={value!r:.60}, {problem}")
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))

    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str | Path = "preprocessor_config.json") -> ImageProcessor:
        """Build from the dict of a `preprocessor_config.json` (BlipImageProcessor), every value checked.

        Errors are CheckpointErrors naming `source` and the key: the size is limited to 1..MAX_IMAGE_SIZE pixels per
        side, mean and std are 3 finite numbers (std > 0), resample a PIL filter, rescale_factor finite and > 0.
        """
        check(config, {"do_resize": BOOL, "do_rescale": BOOL, "do_normalize": BOOL, "do_convert_rgb": BOOL}, source)
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if not config.get(key, True):
                raise CheckpointError(f"{source}: '{key}' is false; blipkit supports only the BLIP pipeline (resize, "
                                      "rescale, normalise): remove the key or preprocess images yourself")
        size = raw_size = config.get("size", 384)
        if isinstance(size, dict):
            missing = [k for k in ("height", "width") if k not in size]
            if missing:
                raise fail(source, "size", f"is {size!r:.60}, without {' and '.join(missing)}: BLIP resizes to "
                           "a fixed {'height': H, 'width': W}")
            size = (size["height"], size["width"])
        elif isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        values = {"size": size, "mean": config.get("image_mean", OPENAI_CLIP_MEAN),
                  "std": config.get("image_std", OPENAI_CLIP_STD),
                  "resample": config.get("resample", Image.Resampling.BICUBIC),
                  "rescale_factor": config.get("rescale_factor", 1 / 255)}
        keys = {"mean": "image_mean", "std": "image_std"}
        for name, value in values.items():
            problem = _PROBLEMS[name](value)
            if problem is not None:
                shown = raw_size if name == "size" else value
                raise fail(source, keys.get(name, name), f"is {shown!r:.60}, {problem}")
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The `preprocessor_config.json` dict transformers' `BlipImageProcessor` reads (inverse of `from_hf`)."""
        return {"image_processor_type": "BlipImageProcessor", "do_resize": True, "do_rescale": True,
                "do_normalize": True, "do_convert_rgb": True, "size": {"height": self.size[0], "width": self.size[1]},
                "resample": int(self.resample), "rescale_factor": self.rescale_factor,
                "image_mean": list(self.mean), "image_std": list(self.std)}

    @cached_property
    def _lut(self) -> np.ndarray:
        """(3, 256) float32: the normalised value of every uint8 level, per channel, in the reference's arithmetic."""
        levels = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean, std = np.array(self.mean, dtype=np.float32), np.array(self.std, dtype=np.float32)
        return (levels[None, :] - mean[:, None]) / std[:, None]

    def _pixels(self, image: Image.Image) -> np.ndarray:
        height, width = self.size
        chw = np.asarray(image.resize((width, height), resample=self.resample)).transpose(2, 0, 1)  # (3, H, W) uint8
        out = np.empty(chw.shape, dtype=np.float32)
        for c in range(3):  # a table look-up per channel: np.take is ~3x faster than fancy indexing here
            np.take(self._lut[c], chw[c], out=out[c])
        return out  # (3, H, W) float32

    def __call__(self, images: ImageLike | list[ImageLike]) -> torch.Tensor:
        """Preprocess one image or a list (paths, PIL images, or already preprocessed tensors) into (N, 3, H, W)."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InputError("no images given: pass a path, a PIL image, a preprocessed tensor, or a list of them")
        batches = []
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                batches.append(check_pixels(item, self.size, f"image {i} (a tensor)"))
            elif isinstance(item, (str, Path, Image.Image)):
                if isinstance(item, str) and not item.strip():
                    raise InputError(f"image {i} is an empty path: pass a path, a PIL image or a tensor")
                batches.append(torch.from_numpy(self._pixels(load_image(item)))[None])
            else:
                raise InputError(f"image {i} is a {type(item).__name__}: pass a path, a PIL image or a tensor")
        return batches[0] if len(batches) == 1 else torch.cat(batches)
