"""What BLIP and BLIP-2 models share: inputs (images, texts) turned into tensors, device / dtype, capability checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CapabilityError, InputError

ImageInput = Any  # a path, a PIL image, a (3, H, W) / (N, 3, H, W) tensor, or a list of those
TextInput = str | Sequence[str]


class BlipBase(nn.Module):
    """Owns the tokenizer and the image processor that travel with a checkpoint."""

    #: checkpoint family name used in messages
    family = "BLIP"

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = None  # processing.Tokenizer, set by the loader
        self.processor = None  # processing.ImageProcessor, set by the loader
        self.name_or_path = "<unsaved model>"

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the weights."""
        return next(self.parameters()).dtype

    def has(self, part: str) -> bool:
        """Whether the model has a top-level part (e.g. `itm_head`, `text_decoder`)."""
        return hasattr(self, part) and isinstance(getattr(self, part), (nn.Module, nn.Parameter))

    @property
    def capabilities(self) -> frozenset[str]:
        """What this model can do ("itc", "caption", ...; see `config.CAPABILITIES`), from its family's table."""
        return self.config.capabilities

    def can(self, capability: str) -> bool:
        """Whether the model has `capability` (a name in `config.CAPABILITIES`)."""
        return self.config.unable(capability) is None

    def require(self, capability: str, doing: str | None = None) -> None:
        """Raise CapabilityError unless the model has `capability`, saying why and naming the checkpoints that can.

        `doing` words what was asked when it is more than the capability (e.g. "train ITC").
        """
        from .capabilities import checkpoints_with
        from .config import CAPABILITIES

        why = self.config.unable(capability)
        if why is None:
            return
        names = ", ".join(checkpoints_with(capability, first=self.family))
        raise CapabilityError(f"{self.name_or_path} cannot {doing or CAPABILITIES[capability]}: {why}. "
                              f"Checkpoints that can: {names}.")

    def keep_float32(self, name: str) -> bool:
        """Whether parameter `name` stays float32 when the model is loaded in half precision."""
        return False

    def default_processor(self):
        """Image preprocessing of the architecture when the checkpoint ships no preprocessor_config.json."""
        from .processing import ImageProcessor

        cfg = self.config
        return ImageProcessor(size=cfg.vision_config.image_size, mean=cfg.image_mean, std=cfg.image_std)

    def pixels(self, images: ImageInput) -> Tensor:
        """Images -> normalised pixels (N, 3, H, W) on the model's device and dtype.

        A tensor is taken only as already normalised float pixels of the processor's size (see `check_pixels`).
        """
        from .processing.image import check_pixels

        if isinstance(images, ImageFeatures):
            raise InputError("got image features where images are needed: pass images (paths, PIL images, pixels)")
        if isinstance(images, Tensor):
            size = self.processor.size if self.processor is not None else (self.config.vision_config.image_size,) * 2
            x = check_pixels(images, size)
        else:
            if isinstance(images, (list, tuple)) and len(images) == 0:
                raise InputError("no images given (empty list)")
            if self.processor is None:
                raise InputError("this model has no image processor; pass preprocessed (N, 3, H, W) tensors")
            x = self.processor(images)
        return x.to(self.device, self.dtype)

    def _feats(self, images: ImageInput | Tensor) -> Tensor:
        """Images, or precomputed features, -> plain feature tensor (N, 1 + P, W), with autograd as the caller has it.

        Features are recognised by their `ImageFeatures` type (what `image_features` returns), or, for a plain float
        tensor, by exactly the shape (N, 1 + P, W) of this model's ViT on the processor's image size.
        """
        if isinstance(images, Tensor) and (isinstance(images, ImageFeatures) or self._is_feature_shape(images)):
            feats = images.as_subclass(Tensor)
            width = self.config.vision_config.hidden_size
            if feats.dim() != 3 or feats.shape[-1] != width or not feats.is_floating_point() or not feats.shape[0]:
                raise InputError(f"image features have shape {tuple(feats.shape)} and dtype {feats.dtype}; "
                                 f"expected float (N, 1 + P, {width}) from image_features()")
            if not bool(torch.isfinite(feats).all()):
                raise InputError("image features contain NaN or infinite values")
            return feats.to(self.device, self.dtype)
        return self.vision_model(self.pixels(images))

    def _is_feature_shape(self, x: Tensor) -> bool:
        """Whether a plain tensor has exactly the shape of this model's features (and not that of a pixel image)."""
        vc = self.config.vision_config
        h, w = self.processor.size if self.processor is not None else (vc.image_size, vc.image_size)
        patches = (h // vc.patch_size) * (w // vc.patch_size)
        return x.dim() == 3 and x.is_floating_point() and tuple(x.shape[1:]) == (1 + patches, vc.hidden_size) \
            and tuple(x.shape) != (3, h, w)

    def tokens(
        self, texts: TextInput, max_length: int | None = None, padding_side: str = "right"
    ) -> tuple[Tensor, Tensor]:
        """Texts -> (input_ids, attention_mask) on the model's device; over-long texts are truncated."""
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; load it from a checkpoint directory with tokenizer files")
        ids, mask = self.tokenizer(text_list(texts), max_length=max_length, padding_side=padding_side)
        return ids.to(self.device), mask.to(self.device)


class ImageFeatures(Tensor):
    """Patch features (N, 1 + P, W) as `image_features` returns them: a tensor that the models' methods accept in
    place of images. Slicing, `torch.cat`, `.to()` keep the type; `torch.Tensor(x)` / `x.as_subclass(Tensor)` drop it.
    """


def as_list(x: Any) -> list:
    """A single item or a sequence -> list (strings and tensors count as single items)."""
    if isinstance(x, (str, Tensor)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)


def text_list(texts: Any, what: str = "texts", item: str = "text") -> list[str]:
    """A string (one text, never its characters) or a list / tuple of strings -> list of checked texts.

    Anything else, an empty list, and blank or non-Unicode texts are InputErrors naming `what` / `item i`.
    """
    from .processing.tokenizer import check_text

    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, (list, tuple)):
        raise InputError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InputError(f"no {what} given (empty list)")
    for i, t in enumerate(texts):
        check_text(t, f"{item} {i}")
    return list(texts)


def check_prompts(prompt: Any) -> list[str | None]:
    """A prompt (str or None) or a list of them -> list, with None for "no prompt" (also for "" and whitespace)."""
    from .processing.tokenizer import check_text

    items = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
    if not items:
        raise InputError("no prompts given (empty list): pass None for no prompt")
    out: list[str | None] = []
    for i, p in enumerate(items):
        if p is not None and not isinstance(p, str):
            raise InputError(f"prompt {i} is a {type(p).__name__}: pass a string (or None for no prompt)")
        if p is not None and p.strip():
            check_text(p, f"prompt {i}")
        out.append(p if p is not None and p.strip() else None)
    return out
