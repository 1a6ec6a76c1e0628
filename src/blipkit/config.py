"""Dataclass configs of BLIP's towers and the named presets of the Salesforce checkpoints.

Field names follow the Hugging Face `config.json` so a checkpoint's own config decides the architecture:
`BlipConfig.from_hf(json.load(...))` reads one, `to_hf()` writes one transformers can read back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, InputError
from .fields import (
    BOOL,
    EPS,
    MAX_FFN,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    PROB,
    Int,
    Rule,
    check,
    check_heads,
    check_token_ids,
    require,
    section,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The Hugging Face architectures blipkit builds, and the parts (top-level modules) each one holds.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "BlipForImageTextRetrieval": ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head"),
    "BlipForConditionalGeneration": ("vision_model", "text_decoder"),
    "BlipForQuestionAnswering": ("vision_model", "text_encoder", "text_decoder"),
}

# What a model can do, by name, and how a refusal says it ("<model> cannot <this>"). Which checkpoints can is decided
# by the family's table (`BlipConfig.unable`, `Blip2Config.unable`) from the config alone.
CAPABILITIES: dict[str, str] = {
    "itc": "compute ITC embeddings and similarities",
    "itm": "match images and texts with the ITM head",
    "caption": "caption images",
    "vqa": "answer questions",
    "rank_answers": "rank given answers to a question",
    "generate": "follow instructions",
    "ground": "ground phrases (GradCAM over the ITM pass)",
    "attention": "read cross-attention maps",
}
# How messages name the parts (top-level modules) of both families.
PART_NAMES: dict[str, str] = {
    "text_encoder": "text encoder",
    "text_decoder": "text decoder",
    "vision_proj": "ITC projection",
    "text_proj": "ITC projection",
    "vision_projection": "ITC projection",
    "text_projection": "ITC projection",
    "itm_head": "ITM head",
    "embeddings": "Q-Former text input",
    "language_model": "language model",
    "language_projection": "language projection",
}
# The parts each BLIP capability needs (all of them); `BlipConfig.unable` adds what the parts alone do not say.
BLIP_NEEDS: dict[str, tuple[str, ...]] = {
    "itc": ("text_encoder", "vision_proj", "text_proj"),
    "itm": ("text_encoder", "itm_head"),
    "caption": ("text_decoder",),
    "vqa": ("text_encoder", "text_decoder"),
    "rank_answers": ("text_encoder", "text_decoder"),
    "ground": ("text_encoder", "itm_head"),
    "attention": (),
    "generate": (),
}


def no_parts(needs: tuple[str, ...], parts: tuple[str, ...]) -> str | None:
    """"it has no ..." naming the parts of `needs` missing from `parts`, or None when all are there."""
    missing: dict[str, list[str]] = {}
    for p in needs:
        if p not in parts:
            missing.setdefault(PART_NAMES.get(p, p), []).append(p)
    if not missing:
        return None
    return "it has no " + ", ".join(f"{what}{'s' * (len(ps) > 1)} ({', '.join(ps)})" for what, ps in missing.items())


def check_capability(capability: str) -> None:
    """InputError unless `capability` is one of `CAPABILITIES`."""
    if capability not in CAPABILITIES:
        raise InputError(f"unknown capability {capability!r:.40}: use one of {', '.join(CAPABILITIES)}")


def _pick(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keys of `d` that are fields of dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


VISION_RULES: dict[str, Rule] = {
    "hidden_size": Int(1, MAX_HIDDEN),
    "intermediate_size": Int(1, MAX_FFN),
    "num_hidden_layers": Int(1, MAX_LAYERS),
    "num_attention_heads": Int(1, MAX_HEADS),
    "image_size": Int(1, MAX_IMAGE_SIZE),
    "patch_size": Int(1, MAX_IMAGE_SIZE),
    "hidden_act": Rule(str),
    "layer_norm_eps": EPS,
    "qkv_bias": BOOL,
}
TEXT_RULES: dict[str, Rule] = {
    "vocab_size": Int(1, MAX_VOCAB),
    "hidden_size": Int(1, MAX_HIDDEN),
    "encoder_hidden_size": Int(1, MAX_HIDDEN),
    "intermediate_size": Int(1, MAX_FFN),
    "num_hidden_layers": Int(1, MAX_LAYERS),
    "num_attention_heads": Int(1, MAX_HEADS),
    "max_position_embeddings": Int(1, MAX_POSITIONS),
    "hidden_act": Rule(str),
    "layer_norm_eps": EPS,
    "label_smoothing": PROB,
    "cross_attention_frequency": Int(1, MAX_LAYERS),
}


def check_activation(name: str, source: str, key: str) -> None:
    """The activation must be one the towers implement."""
    from .layers import activation

    try:
        activation(name)
    except ValueError as e:
        raise CheckpointError(f"{source}: '{key}': {e}; correct it or restore the file from the checkpoint") from None


def read_vision(d: dict[str, Any], source: str, prefix: str, defaults: dict[str, Any] | None = None) -> VisionConfig:
    """A VisionConfig from its `config.json` section, every value checked before use."""
    check(d, VISION_RULES, source, prefix)
    cfg = VisionConfig(**{**(defaults or {}), **_pick(VisionConfig, d)})
    check_heads(cfg.hidden_size, cfg.num_attention_heads, source, prefix)
    check_activation(cfg.hidden_act, source, f"{prefix}hidden_act")
    require(cfg.image_size % cfg.patch_size == 0, source, f"{prefix}patch_size",
            f"is {cfg.patch_size}, which does not divide image_size {cfg.image_size}")
    return cfg


def read_text(
    d: dict[str, Any], source: str, prefix: str, required_ids: tuple[str, ...] = (), **fixed: Any
) -> TextConfig:
    """A TextConfig from its `config.json` section (plus `fixed` fields), every value checked before use.

    `required_ids` are the token ids the model uses, which may not be null.
    """
    check(d, TEXT_RULES, source, prefix)
    cfg = TextConfig(**{**_pick(TextConfig, d), **fixed})
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id")
    check_token_ids(d, cfg, source, prefix, keys, required_ids)
    check_heads(cfg.hidden_size, cfg.num_attention_heads, source, prefix)
    check_activation(cfg.hidden_act, source, f"{prefix}hidden_act")
    return cfg


def kind_of(d: dict[str, Any]) -> str:
    """What a config.json says it is (its model_type, else its first architecture), quoted, for errors."""
    kind, archs = d.get("model_type"), d.get("architectures")
    if not kind and isinstance(archs, list) and archs:
        kind = archs[0]
    return repr(kind)[:60] if kind else "<no model_type>"


def architecture(d: dict[str, Any], source: str, default: str) -> str:
    """The first entry of `architectures` (a non-empty list of names), or `default` when the key is absent."""
    archs = d.get("architectures")
    if archs is None:
        return default
    require(isinstance(archs, list) and bool(archs) and all(isinstance(a, str) for a in archs), source,
            "architectures", f"is {archs!r:.60}, not a list of architecture names")
    return archs[0]


@dataclass
class VisionConfig:
    """ViT image encoder (BLIP's ViT-B/L and BLIP-2's EVA ViT-g)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 384
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    # The fused qkv projection has a bias: always in BLIP; in BLIP-2 (EVA) per config, stored fused as
    # (q_bias, zeros, v_bias) since EVA has no k bias.
    qkv_bias: bool = True

    @property
    def grid(self) -> int:
        """Patches per side at the configured image size."""
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """BERT-style text stack with cross-attention (BLIP's MED; with the flags below, BLIP-2's Q-Former)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    encoder_hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    bos_token_id: int = 30522
    eos_token_id: int = 2
    pad_token_id: int = 0
    sep_token_id: int = 102
    label_smoothing: float = 0.0
    # Q-Former flags: cross-attention only in layers i % k == 0, a separate feed-forward for query positions,
    # and whether text positions exist at all (the text feed-forward). BLIP: 1, False, True.
    cross_attention_frequency: int = 1
    query_ffn: bool = False
    text_ffn: bool = True


@dataclass
class BlipConfig:
    """A whole BLIP model: towers, projection size and which heads (parts) it has."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_text_hidden_size: int = 256
    parts: tuple[str, ...] = ARCHITECTURES["BlipForImageTextRetrieval"]
    architecture: str = "BlipForImageTextRetrieval"
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> BlipConfig:
        """Read a Hugging Face BLIP `config.json` dict; `source` names it in errors."""
        if d.get("model_type") != "blip":
            raise CheckpointError(
                f"{source}: found a {kind_of(d)} checkpoint, expected a BLIP one (model_type 'blip', architectures "
                f"{sorted(ARCHITECTURES)}). BLIP-2 checkpoints load with the same blipkit.load()."
            )
        arch = architecture(d, source, "BlipForImageTextRetrieval")
        parts = _parts(d, arch, source)
        check(d, {"image_text_hidden_size": Int(1, MAX_HIDDEN)}, source)
        vision = read_vision(section(d, "vision_config", source), source, "vision_config.")
        text_d = dict(section(d, "text_config", source))
        text_d.setdefault("encoder_hidden_size", vision.hidden_size)
        text = read_text(text_d, source, "text_config.", ("bos_token_id", "pad_token_id", "sep_token_id"))
        return cls(
            vision_config=vision,
            text_config=text,
            image_text_hidden_size=d.get("image_text_hidden_size", 256),
            parts=parts,
            architecture=arch,
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict transformers reads (plus `blipkit_parts` for multi-head models)."""
        text = dataclasses.asdict(self.text_config)
        for k in ("cross_attention_frequency", "query_ffn", "text_ffn"):
            text.pop(k)
        text["model_type"] = "blip_text_model"
        vision = dataclasses.asdict(self.vision_config)
        vision.pop("qkv_bias")
        vision["model_type"] = "blip_vision_model"
        out = {
            "model_type": "blip",
            "architectures": [self.architecture],
            "vision_config": vision,
            "text_config": text,
            "image_text_hidden_size": self.image_text_hidden_size,
            "projection_dim": self.image_text_hidden_size,
        }
        if tuple(self.parts) != ARCHITECTURES.get(self.architecture):
            out["blipkit_parts"] = list(self.parts)
        return out

    @property
    def decoder_reads_image(self) -> bool:
        """Whether the text decoder cross-attends to image patches (a captioner) rather than to the question
        encoder's states (the answer decoder of BlipForQuestionAnswering, which has a text encoder and no ITC)."""
        parts = self.parts
        return "text_decoder" in parts and ("vision_proj" in parts or "text_encoder" not in parts)

    def unable(self, capability: str) -> str | None:
        """Why a BLIP checkpoint of this config cannot do `capability`, or None when it can: BLIP's capability table."""
        check_capability(capability)
        if capability == "generate":
            return "BLIP has no language model to follow instructions"
        if capability == "attention":
            return None if {"text_encoder", "text_decoder"} & set(self.parts) else "it has no text encoder or decoder"
        if why := no_parts(BLIP_NEEDS[capability], self.parts):
            return why
        if capability == "caption" and not self.decoder_reads_image:
            return "its text decoder is a VQA answer decoder: it reads the question encoder's states, not the image"
        tc = self.text_config
        if capability in ("vqa", "rank_answers") and tc.encoder_hidden_size != tc.hidden_size:
            # as in the reference, the decoder's cross-attention takes encoder_hidden_size-wide inputs
            return (f"its text decoder's cross-attention takes {tc.encoder_hidden_size}-wide inputs and the question "
                    f"encoder's states are {tc.hidden_size} wide")
        return None

    @property
    def capabilities(self) -> frozenset[str]:
        """Every capability (see `CAPABILITIES`) a BLIP checkpoint of this config has."""
        return frozenset(c for c in CAPABILITIES if self.unable(c) is None)


def _parts(d: dict[str, Any], arch: str, source: str) -> tuple[str, ...]:
    """The heads a BLIP checkpoint holds: blipkit's own `blipkit_parts`, else those of its architecture."""
    parts = d.get("blipkit_parts")
    if parts is None:
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{source}: architecture '{arch}' is not one of {sorted(ARCHITECTURES)}")
        return ARCHITECTURES[arch]
    known = sorted({p for ps in ARCHITECTURES.values() for p in ps})
    ok = isinstance(parts, list) and all(isinstance(p, str) and p in known for p in parts) and "vision_model" in parts
    require(ok, source, "blipkit_parts", f"is {parts!r:.80}, not a list of parts including 'vision_model' "
            f"(known: {', '.join(known)})")
    return tuple(parts)


def _base_vision(image_size: int = 384) -> VisionConfig:
    return VisionConfig(image_size=image_size)


def _large_vision(image_size: int = 384) -> VisionConfig:
    return VisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=image_size
    )


def _preset(arch: str, vision: VisionConfig) -> BlipConfig:
    return BlipConfig(
        vision_config=vision,
        text_config=TextConfig(encoder_hidden_size=vision.hidden_size),
        parts=ARCHITECTURES[arch],
        architecture=arch,
    )


# Every Salesforce BLIP checkpoint on the Hub: name -> (repo id, architecture config).
# The checkpoint's own config.json is what loading uses; these describe the architecture for `create()`.
PRESETS: dict[str, tuple[str, BlipConfig]] = {
    "blip-itm-base-coco": ("Salesforce/blip-itm-base-coco", _preset("BlipForImageTextRetrieval", _base_vision())),
    "blip-itm-large-coco": ("Salesforce/blip-itm-large-coco", _preset("BlipForImageTextRetrieval", _large_vision())),
    "blip-itm-base-flickr": ("Salesforce/blip-itm-base-flickr", _preset("BlipForImageTextRetrieval", _base_vision())),
    "blip-itm-large-flickr": (
        "Salesforce/blip-itm-large-flickr",
        _preset("BlipForImageTextRetrieval", _large_vision()),
    ),
    "blip-image-captioning-base": (
        "Salesforce/blip-image-captioning-base",
        _preset("BlipForConditionalGeneration", _base_vision()),
    ),
    "blip-image-captioning-large": (
        "Salesforce/blip-image-captioning-large",
        _preset("BlipForConditionalGeneration", _large_vision()),
    ),
    "blip-vqa-base": ("Salesforce/blip-vqa-base", _preset("BlipForQuestionAnswering", _base_vision())),
    # ViT-B despite the name (CapFilt-L is the bootstrapped data): its config.json sets no vision widths
    "blip-vqa-capfilt-large": (
        "Salesforce/blip-vqa-capfilt-large",
        _preset("BlipForQuestionAnswering", _base_vision()),
    ),
}
