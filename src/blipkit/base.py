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

    def require(self, method: str, *parts: str) -> None:
        """Raise CapabilityError if a part `method` needs is missing, naming the checkpoints that have it."""
        missing = [p for p in parts if not self.has(p)]
        if missing:
            raise CapabilityError(
                f"{self.name_or_path} cannot {method}: it has no {', '.join(missing)}. "
                f"Checkpoints that can: {', '.join(self.checkpoints_with(missing[0]))}."
            )

    def keep_float32(self, name: str) -> bool:
        """Whether parameter `name` stays float32 when the model is loaded in half precision."""
        return False

    def default_processor(self):
        """Image preprocessing of the architecture when the checkpoint ships no preprocessor_config.json."""
        from .processing import ImageProcessor

        cfg = self.config
        return ImageProcessor(size=cfg.vision_config.image_size, mean=cfg.image_mean, std=cfg.image_std)

    def checkpoints_with(self, part: str) -> list[str]:
        """Names of checkpoints that have `part` (overridden per family)."""
        return []

    def pixels(self, images: ImageInput) -> Tensor:
        """Images -> normalised pixels (N, 3, H, W) on the model's device and dtype."""
        if isinstance(images, Tensor):
            x = images if images.dim() == 4 else images[None]
            if x.dim() != 4 or x.shape[1] != 3:
                raise InputError(f"image tensor must be (3, H, W) or (N, 3, H, W), got {tuple(images.shape)}")
        else:
            if isinstance(images, (list, tuple)) and len(images) == 0:
                raise InputError("no images given (empty list)")
            if self.processor is None:
                raise InputError("this model has no image processor; pass preprocessed (N, 3, H, W) tensors")
            x = self.processor(images)
        return x.to(self.device, self.dtype)

    def tokens(
        self, texts: TextInput, max_length: int | None = None, padding_side: str = "right"
    ) -> tuple[Tensor, Tensor]:
        """Texts -> (input_ids, attention_mask) on the model's device; over-long texts are truncated."""
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; load it from a checkpoint directory with tokenizer files")
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise InputError("no texts given (empty list)")
        ids, mask = self.tokenizer(texts, max_length=max_length, padding_side=padding_side)
        return ids.to(self.device), mask.to(self.device)


def as_list(x: Any) -> list:
    """A single item or a sequence -> list (strings and tensors count as single items)."""
    if isinstance(x, (str, Tensor)) or not isinstance(x, (list, tuple)):
        return [x]
    return list(x)
