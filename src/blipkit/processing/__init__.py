"""What travels with a checkpoint besides its weights: image preprocessing (`image`) and the tokenizer (`tokenizer`)."""

from .image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, load_image
from .tokenizer import BLIP_DEC, BLIP_ENC, Tokenizer

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ImageProcessor", "load_image", "BLIP_DEC", "BLIP_ENC", "Tokenizer"]
