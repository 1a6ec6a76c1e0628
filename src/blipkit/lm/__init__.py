"""The language models of BLIP-2: OPT (decoder-only) and T5 / Flan-T5 (encoder-decoder)."""

from .opt import OPTConfig, OPTForCausalLM
from .t5 import T5Config, T5ForConditionalGeneration

__all__ = ["OPTConfig", "OPTForCausalLM", "T5Config", "T5ForConditionalGeneration"]
