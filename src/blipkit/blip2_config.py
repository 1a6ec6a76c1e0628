"""BLIP-2 configs (EVA ViT-g, the Q-Former on the shared text stack, OPT or Flan-T5) and the Salesforce presets.

`Blip2Config.from_hf` reads a Hugging Face `config.json` dict, filling what it omits with the reference defaults
(the Hub configs list only what differs from them); `to_hf()` writes one transformers reads back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import (
    CAPABILITIES,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TextConfig,
    VisionConfig,
    architecture,
    check_capability,
    kind_of,
    no_parts,
    read_text,
    read_vision,
)
from .errors import CheckpointError
from .fields import MAX_HIDDEN, MAX_POSITIONS, MAX_QUERY_TOKENS, MAX_VOCAB, Int, Rule, check, require, section
from .lm import OPTConfig, T5Config

GENERATION = "Blip2ForConditionalGeneration"
RETRIEVAL = "Blip2ForImageTextRetrieval"
# The Hugging Face architectures blipkit builds and the parts (top-level modules) each holds.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    GENERATION: ("vision_model", "query_tokens", "qformer", "language_projection", "language_model"),
    RETRIEVAL: (
        "vision_model",
        "query_tokens",
        "embeddings",
        "qformer",
        "vision_projection",
        "text_projection",
        "itm_head",
    ),
}
ALIASES = {"Blip2Model": GENERATION}  # same weights as the generation model
# The parts each BLIP-2 capability needs (all of them); ranking given answers is BLIP's alone.
NEEDS: dict[str, tuple[str, ...]] = {
    "itc": ("embeddings", "vision_projection", "text_projection"),
    "itm": ("embeddings", "itm_head"),
    "ground": ("embeddings", "itm_head"),
    "caption": ("language_projection", "language_model"),
    "vqa": ("language_projection", "language_model"),
    "generate": ("language_projection", "language_model"),
    "attention": ("qformer",),
}

# Reference defaults of the sub-configs (EVA ViT-g/14 at 224 px; BERT-base Q-Former).
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=1408,
    intermediate_size=6144,
    num_hidden_layers=39,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    qkv_bias=True,
)
QFORMER_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    cross_attention_frequency=2,
)
T5_CONTEXT = 512  # tokens T5 was trained on (`n_positions`); its relative positions have no hard limit


@dataclass
class Blip2Config:
    """A whole BLIP-2 model: image encoder, Q-Former, language model (generation) or heads (retrieval)."""

    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(**VISION_DEFAULTS))
    qformer_config: TextConfig = field(
        default_factory=lambda: TextConfig(**QFORMER_DEFAULTS, encoder_hidden_size=1408, query_ffn=True, text_ffn=False)
    )
    text_config: OPTConfig | T5Config | None = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None  # the `<image>` placeholder the reference expands into the query outputs
    prompt_bos_token_id: int | None = None  # language-model input when there is no prompt (OPT `</s>`, T5 `</s>`)
    lm_context: int | None = None  # positions the language-model input holds (None: the model's own limit)
    architecture: str = GENERATION
    parts: tuple[str, ...] = ARCHITECTURES[GENERATION]
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @property
    def lm_type(self) -> str | None:
        """Language model kind: "opt", "t5", or None for the retrieval checkpoints."""
        if "language_model" not in self.parts:
            return None
        return "t5" if isinstance(self.text_config, T5Config) else "opt"

    @property
    def context(self) -> int:
        """How many positions (query tokens + prompt, + new tokens for OPT) the language model can take."""
        if self.lm_context is not None:
            return self.lm_context
        return self.text_config.max_position_embeddings if self.lm_type == "opt" else T5_CONTEXT

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> Blip2Config:
        """Read a Hugging Face BLIP-2 `config.json` dict; `source` names it in errors."""
        if d.get("model_type") != "blip-2":
            raise CheckpointError(f"{source}: found a {kind_of(d)} checkpoint, expected a BLIP-2 one ('blip-2')")
        arch = architecture(d, source, GENERATION)
        arch = ALIASES.get(arch, arch)
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{source}: architecture '{arch}' is not one of {sorted(ARCHITECTURES)}")
        check(d, {"num_query_tokens": Int(1, MAX_QUERY_TOKENS), "image_text_hidden_size": Int(1, MAX_HIDDEN),
                  "image_token_index": Int(0, MAX_VOCAB, nullable=True)}, source)
        vision = read_vision(section(d, "vision_config", source), source, "vision_config.", VISION_DEFAULTS)
        q = {**QFORMER_DEFAULTS, **section(d, "qformer_config", source)}
        check(q, {"use_qformer_text_input": Rule(bool, nullable=True)}, source, "qformer_config.")
        qformer = read_text(
            q,
            source,
            "qformer_config.",
            encoder_hidden_size=vision.hidden_size,  # the reference always sets it from the vision tower
            query_ffn=True,
            text_ffn=bool(q.get("use_qformer_text_input")),
        )
        if arch == RETRIEVAL and not qformer.text_ffn:
            raise CheckpointError(f"{source}: a retrieval checkpoint needs qformer_config.use_qformer_text_input")
        text, bos, context = None, None, None
        if "language_model" in ARCHITECTURES[arch]:
            text, bos, context = _read_lm(d, source)
            limit = context if context is not None else text.max_position_embeddings
            queries = d.get("num_query_tokens", 32)
            require(queries < limit, source, "num_query_tokens",
                    f"is {queries}, leaving no room in the language model's {limit} positions")
            check(d, {"image_token_index": Int(0, text.vocab_size - 1, nullable=True)}, source)
        return cls(
            vision_config=vision,
            qformer_config=qformer,
            text_config=text,
            num_query_tokens=d.get("num_query_tokens", 32),
            image_text_hidden_size=d.get("image_text_hidden_size", 256),
            image_token_index=d.get("image_token_index"),
            prompt_bos_token_id=bos,
            lm_context=context,
            architecture=arch,
            parts=ARCHITECTURES[arch],
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict transformers' Blip2 classes read."""
        vision = dataclasses.asdict(self.vision_config)
        vision["model_type"] = "blip_2_vision_model"
        qc = self.qformer_config
        qformer = {k: getattr(qc, k) for k in QFORMER_DEFAULTS}
        qformer.update(
            model_type="blip_2_qformer",
            encoder_hidden_size=qc.encoder_hidden_size,
            use_qformer_text_input=qc.text_ffn,
        )
        out: dict[str, Any] = {
            "model_type": "blip-2",
            "architectures": [self.architecture],
            "vision_config": vision,
            "qformer_config": qformer,
            "num_query_tokens": self.num_query_tokens,
            "image_text_hidden_size": self.image_text_hidden_size,
            "image_token_index": self.image_token_index,
        }
        if self.lm_type is not None:
            out["text_config"] = _lm_to_hf(self.text_config, self.prompt_bos_token_id, self.lm_context)
            out["use_decoder_only_language_model"] = self.lm_type == "opt"
        return out

    def unable(self, capability: str) -> str | None:
        """Why a BLIP-2 checkpoint of this config cannot do `capability`, or None when it can: BLIP-2's table."""
        check_capability(capability)
        if capability == "rank_answers":
            return "BLIP-2 generates its answers (ranking given ones takes a BLIP VQA checkpoint)"
        return no_parts(NEEDS[capability], self.parts)

    @property
    def capabilities(self) -> frozenset[str]:
        """Every capability (see `config.CAPABILITIES`) a BLIP-2 checkpoint of this config has."""
        return frozenset(c for c in CAPABILITIES if self.unable(c) is None)


def _read_lm(d: dict[str, Any], source: str) -> tuple[OPTConfig | T5Config, int, int | None]:
    """The language model's config, the id it starts an empty prompt with, and its context (T5 only)."""
    t = dict(section(d, "text_config", source))
    kind = t.get("model_type", "opt")
    if kind == "opt":
        text = OPTConfig.from_hf(t, source, "text_config.")
        return text, t.get("bos_token_id", text.bos_token_id), None
    if kind == "t5":
        if t.get("decoder_start_token_id") is None and t.get("bos_token_id") is not None:
            t["decoder_start_token_id"] = t["bos_token_id"]  # the reference's fallback
        check(t, {"n_positions": Int(1, MAX_POSITIONS)}, source, "text_config.")
        text = T5Config.from_hf(t, source, "text_config.")
        return text, t.get("bos_token_id") or _first(text.eos_token_id), t.get("n_positions", T5_CONTEXT)
    raise CheckpointError(
        f"{source}: language model {kind!r:.40} ('text_config.model_type') is not supported; blipkit runs BLIP-2 "
        "with OPT ('opt') and Flan-T5 ('t5')"
    )


def _first(ids: int | list[int]) -> int:
    return ids if isinstance(ids, int) else ids[0]


def _lm_to_hf(cfg: OPTConfig | T5Config, bos: int | None, context: int | None) -> dict[str, Any]:
    """A language-model config as transformers writes it."""
    d = dataclasses.asdict(cfg)
    if isinstance(cfg, OPTConfig):
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        d["model_type"] = "opt"
    else:
        d.update(model_type="t5", is_encoder_decoder=True, n_positions=context or T5_CONTEXT)
    if bos is not None:
        d["bos_token_id"] = bos
    return d


def _vision(image_size: int = 224) -> VisionConfig:
    return VisionConfig(**{**VISION_DEFAULTS, "image_size": image_size})


def _qformer(text_input: bool = False) -> TextConfig:
    vocab = 30523 if text_input else 30522  # the retrieval tokenizer adds [DEC]
    return TextConfig(
        **{**QFORMER_DEFAULTS, "vocab_size": vocab}, encoder_hidden_size=1408, query_ffn=True, text_ffn=text_input
    )


def _opt(hidden: int, ffn: int, image_size: int = 224) -> Blip2Config:
    lm = OPTConfig(
        vocab_size=50304,
        hidden_size=hidden,
        num_hidden_layers=32,
        ffn_dim=ffn,
        num_attention_heads=32,
        eos_token_id=50118,  # "\n": BLIP-2 OPT stops at the end of the line
    )
    return Blip2Config(_vision(image_size), _qformer(), lm, image_token_index=50265, prompt_bos_token_id=2)


def _t5(d_model: int, d_ff: int, heads: int, image_size: int = 224) -> Blip2Config:
    lm = T5Config(
        vocab_size=32128,
        d_model=d_model,
        d_kv=64,
        d_ff=d_ff,
        num_layers=24,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    return Blip2Config(_vision(image_size), _qformer(), lm, image_token_index=32100, prompt_bos_token_id=1)


def _itm(image_size: int = 224) -> Blip2Config:
    return Blip2Config(
        _vision(image_size), _qformer(text_input=True), None, architecture=RETRIEVAL, parts=ARCHITECTURES[RETRIEVAL]
    )


# Every Salesforce BLIP-2 checkpoint: name -> (repo id, architecture config). Loading uses the checkpoint's own
# config.json; these describe the architecture for `create()` (the COCO fine-tunes run the ViT at 364 px).
PRESETS: dict[str, tuple[str, Blip2Config]] = {
    "blip2-opt-2.7b": ("Salesforce/blip2-opt-2.7b", _opt(2560, 10240)),
    "blip2-opt-6.7b": ("Salesforce/blip2-opt-6.7b", _opt(4096, 16384)),
    "blip2-opt-2.7b-coco": ("Salesforce/blip2-opt-2.7b-coco", _opt(2560, 10240, 364)),
    "blip2-opt-6.7b-coco": ("Salesforce/blip2-opt-6.7b-coco", _opt(4096, 16384, 364)),
    "blip2-flan-t5-xl": ("Salesforce/blip2-flan-t5-xl", _t5(2048, 5120, 32)),
    "blip2-flan-t5-xxl": ("Salesforce/blip2-flan-t5-xxl", _t5(4096, 10240, 64)),
    "blip2-flan-t5-xl-coco": ("Salesforce/blip2-flan-t5-xl-coco", _t5(2048, 5120, 32, 364)),
    "blip2-itm-vit-g": ("Salesforce/blip2-itm-vit-g", _itm()),
    "blip2-itm-vit-g-coco": ("Salesforce/blip2-itm-vit-g-coco", _itm(364)),
}
