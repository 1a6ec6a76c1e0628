"""Small BLIP architectures trained from scratch, and their initialisation.

A from-scratch model has every head (ITC + ITM, captioning, VQA) in one network: the text decoder attends to image
patches when captioning and to the question encoder's states when answering, so the vision and text widths match.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..blip import Blip
from ..config import BlipConfig, TextConfig, VisionConfig
from ..errors import InputError
from ..processing import ImageProcessor, Tokenizer

ALL_PARTS = ("vision_model", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head")


@dataclass(frozen=True)
class Arch:
    """Sizes of a from-scratch BLIP (one width for both towers)."""

    image_size: int
    patch_size: int
    width: int
    heads: int
    vision_layers: int
    text_layers: int
    intermediate: int
    embed_dim: int
    max_text_length: int = 64


ARCHS: dict[str, Arch] = {
    # the shipped `scenes-blip`: about 5.6 M parameters, 22 MB in float32
    "small": Arch(image_size=128, patch_size=16, width=192, heads=4, vision_layers=4, text_layers=4,
                  intermediate=512, embed_dim=128),
    # for tests: trains a few dozen steps in seconds
    "tiny": Arch(image_size=32, patch_size=8, width=32, heads=2, vision_layers=2, text_layers=2,
                 intermediate=64, embed_dim=16, max_text_length=40),
}


def arch_config(arch: Arch, tokenizer: Tokenizer) -> BlipConfig:
    """The `BlipConfig` of `arch` with the token ids and vocabulary size of `tokenizer`."""
    vision = VisionConfig(hidden_size=arch.width, intermediate_size=arch.intermediate,
                          num_hidden_layers=arch.vision_layers, num_attention_heads=arch.heads,
                          image_size=arch.image_size, patch_size=arch.patch_size)
    text = TextConfig(vocab_size=tokenizer.vocab_size, hidden_size=arch.width, encoder_hidden_size=arch.width,
                      intermediate_size=arch.intermediate, num_hidden_layers=arch.text_layers,
                      num_attention_heads=arch.heads, max_position_embeddings=arch.max_text_length,
                      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                      sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=arch.embed_dim,
                      parts=ALL_PARTS, architecture="BlipForImageTextRetrieval")


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """BERT/ViT-style initialisation: normal(0, std) weights and embeddings, zero biases, unit LayerNorms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name, p in model.named_parameters():
        if name.endswith(("class_embedding", "position_embedding")):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        elif name == "query_tokens":  # BLIP-2's learned queries: equal ones would stay equal (same gradients)
            nn.init.normal_(p, std=std)
        elif name.endswith("predictions.bias"):
            nn.init.zeros_(p)


def sample_pixels(model: Blip, items: list, n: int, seed: int = 0) -> Tensor:
    """Preprocessed pixels of `n` training items drawn without replacement (all of them when there are fewer)."""
    rng = random.Random(seed)
    chosen = rng.sample(items, min(n, len(items)))
    images = [it.image if isinstance(it.image, Path) else Image.open(io.BytesIO(it.image)) for it in chosen]
    return model.processor(images)


@torch.no_grad()
def whiten_patch_embedding(model: Blip, pixels: Tensor, gain: float = 0.5, eps: float = 1e-2) -> None:
    """Set the ViT's patch embedding to the whitening of image patches (their principal directions).

    A from-scratch ViT whose patch projection is random sits at chance on shape for hundreds of steps while it
    learns colour at once; starting from the patches' principal components (each scaled by 1/sqrt(variance), so
    every output starts with comparable variance) gives the first layer edge- and blob-like filters and shortens
    that plateau. `pixels` are preprocessed training images (N, 3, H, W); rows beyond the number of principal
    directions (width > 3 * patch^2) keep their random initialisation.
    """
    conv = model.vision_model.embeddings.patch_embedding
    width, channels, patch, _ = conv.weight.shape
    patches = F.unfold(pixels.float(), patch, stride=patch).transpose(1, 2).reshape(-1, channels * patch * patch)
    patches = patches - patches.mean(0)
    variance, directions = torch.linalg.eigh(patches.T @ patches / len(patches))  # ascending
    k = min(width, len(variance))
    variance, directions = variance.flip(0)[:k], directions.flip(1)[:, :k]
    rows = (directions / (variance.clamp_min(0) + eps).sqrt()).T * gain  # (k, C * p * p)
    conv.weight[:k].copy_(rows.reshape(k, channels, patch, patch).to(conv.weight.dtype))
    conv.bias.zero_()


def scratch_model(arch: str | Arch, tokenizer: Tokenizer, seed: int = 0) -> Blip:
    """A freshly initialised multi-head BLIP of a named architecture, with its tokenizer and image processor."""
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise InputError(f"unknown architecture '{arch}' (known: {', '.join(ARCHS)})")
        arch = ARCHS[arch]
    torch.manual_seed(seed)
    model = Blip(arch_config(arch, tokenizer))
    init_weights(model)
    model.tokenizer = tokenizer
    cfg = model.config
    model.processor = ImageProcessor(size=cfg.vision_config.image_size, mean=cfg.image_mean, std=cfg.image_std)
    model.name_or_path = "<from scratch>"
    return model

