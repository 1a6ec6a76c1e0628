"""A small OPT language model trained from scratch on a dataset's captions: the frozen LM of BLIP-2 stage 2.

The tokenizer is byte-level BPE trained with `tokenizers` on the captions, with OPT's conventions: `</s>` starts
every input and ends every caption, `<pad>` pads, and `<image>` is reserved for BLIP-2's image placeholder. The model
is blipkit's `OPTForCausalLM`, written as a Hugging Face `OPTForCausalLM` directory (config.json, model.safetensors,
tokenizer.json + tokenizer_config.json) that transformers loads as it is and `blipkit train --stage qformer2 --lm`
reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE
from torch import Tensor, nn

from .. import checkpoint
from ..blip2_config import _lm_to_hf
from ..errors import CheckpointError, InputError
from ..lm import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration
from ..processing import Tokenizer
from .blip2_losses import CaptionCollate
from .loop import Recipe
from .model import init_weights

LM_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<image>")  # ids 0..4: OPT's first four, then BLIP-2's placeholder
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class LMArch:
    """Sizes of a from-scratch OPT."""

    width: int
    layers: int
    heads: int
    ffn: int
    positions: int  # learned positions: BLIP-2's queries + prompt + caption must fit
    dropout: float = 0.1


LM_ARCHS: dict[str, LMArch] = {
    "small": LMArch(width=256, layers=4, heads=4, ffn=1024, positions=128),
    # the language model of the shipped `scenes-blip2`: about 1.5 M parameters
    "mini": LMArch(width=192, layers=3, heads=4, ffn=768, positions=64),
    # for tests: trains a few dozen steps in seconds
    "tiny": LMArch(width=32, layers=2, heads=2, ffn=64, positions=64, dropout=0.0),
}


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 768, max_length: int | None = None) -> Tokenizer:
    """Byte-level BPE trained on `texts`, OPT-style: inputs become `</s> text`; no text ever maps to `<unk>`."""
    floor = 256 + len(LM_SPECIALS)  # every byte, plus the special tokens
    if vocab_size < floor:
        raise InputError(f"--vocab-size {vocab_size}: a byte-level vocabulary needs at least {floor} entries")
    backend = Backend(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(LM_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LM_SPECIALS])
    backend.post_processor = processors.TemplateProcessing(single="</s> $A",
                                                           special_tokens=[("</s>", backend.token_to_id("</s>"))])
    special = {"bos": "</s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
    return Tokenizer(backend, special, [IMAGE_TOKEN], model_max_length=max_length)


def scratch_lm(arch: str | LMArch, tokenizer: Tokenizer, seed: int = 0) -> OPTForCausalLM:
    """A freshly initialised OPT of a named architecture over `tokenizer`'s vocabulary."""
    if isinstance(arch, str):
        if arch not in LM_ARCHS:
            raise InputError(f"unknown language-model architecture '{arch}' (known: {', '.join(LM_ARCHS)})")
        arch = LM_ARCHS[arch]
    eos = tokenizer.eos_token_id
    cfg = OPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=arch.width, num_hidden_layers=arch.layers,
                    ffn_dim=arch.ffn, num_attention_heads=arch.heads, max_position_embeddings=arch.positions,
                    dropout=arch.dropout, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=eos)
    torch.manual_seed(seed)
    lm = OPTForCausalLM(cfg)
    init_weights(lm)
    return lm


def save_language_model(lm: OPTForCausalLM, tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write a Hugging Face `OPTForCausalLM` directory: config.json, model.safetensors and the tokenizer files."""
    directory = Path(directory)
    checkpoint.save_weights(lm, directory)
    config = {**_lm_to_hf(lm.config, lm.config.bos_token_id, None), "architectures": ["OPTForCausalLM"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(directory)
    return directory


def load_language_model(path: str | Path) -> tuple[OPTForCausalLM | T5ForConditionalGeneration, Tokenizer]:
    """An OPT or T5 / Flan-T5 directory in Hugging Face format -> (model, tokenizer), loaded strictly."""
    directory = Path(path)
    if not directory.is_dir():
        raise InputError(f"language model '{path}' (--lm): no such directory; pass an OPT or Flan-T5 directory in "
                         "Hugging Face format, e.g. one written by `blipkit train --stage lm`")
    raw = checkpoint.read_config(directory)
    kind = raw.get("model_type")
    if kind == "opt":
        model_cls, cfg = OPTForCausalLM, OPTConfig.from_hf(raw)
    elif kind == "t5":
        raw = {"decoder_start_token_id": raw.get("pad_token_id", 0), **raw}
        model_cls, cfg = T5ForConditionalGeneration, T5Config.from_hf(raw)
    else:
        raise CheckpointError(f"{directory / 'config.json'}: a '{kind}' model; BLIP-2 stage 2 takes an OPT or a "
                              "T5 / Flan-T5 language model")
    with torch.device("meta"):
        lm = model_cls(cfg)
    checkpoint.load_weights(lm, directory, None, "cpu")
    tokenizer = Tokenizer.from_dir(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, the model's "
                              f"embeddings only {cfg.vocab_size}; they belong to different models")
    return lm.eval(), tokenizer


class CausalLMObjectives(nn.Module):
    """A language model trained on captions alone; `forward(batch)` returns {"lm": next-token cross-entropy}."""

    def __init__(self, model: OPTForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss over each caption's tokens and its end token (`bos` is never a target; padding is ignored)."""
        ids, mask = batch["caption_ids"], batch["caption_mask"]
        _, loss = self.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        return {"lm": loss}


def lm_recipe(lm: OPTForCausalLM, tokenizer: Tokenizer, max_length: int | None = None) -> Recipe:
    """Train `lm` on captions (text only: no image is read); saves a Hugging Face OPT directory."""
    cfg = lm.config
    length = min(max_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return Recipe(
        objectives=CausalLMObjectives(lm),
        collate=CaptionCollate(tokenizer, length, "opt"),
        processor=None,
        save=lambda directory: save_language_model(lm, tokenizer, directory),
        unit="text",
    )
