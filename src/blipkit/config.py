"""Dataclass configs of BLIP's towers and the named presets of the Salesforce checkpoints.

Field names follow the Hugging Face `config.json` so a checkpoint's own config decides the architecture:
`BlipConfig.from_hf(json.load(...))` reads one, `to_hf()` writes one transformers can read back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The Hugging Face architectures blipkit builds, and the parts (top-level modules) each one holds.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "BlipForImageTextRetrieval": ("vision_model", "text_encoder", "vision_proj", "text_proj", "itm_head"),
    "BlipForConditionalGeneration": ("vision_model", "text_decoder"),
    "BlipForQuestionAnswering": ("vision_model", "text_encoder", "text_decoder"),
}


def _pick(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keys of `d` that are fields of dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


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
            found = d.get("model_type") or (d.get("architectures") or ["<no model_type>"])[0]
            raise CheckpointError(
                f"{source}: found a '{found}' checkpoint, expected a BLIP one (model_type 'blip', architectures "
                f"{sorted(ARCHITECTURES)}). BLIP-2 checkpoints load with the same blipkit.load()."
            )
        archs = d.get("architectures") or ["BlipForImageTextRetrieval"]
        arch = archs[0]
        parts = d.get("blipkit_parts")
        if parts is None:
            if arch not in ARCHITECTURES:
                raise CheckpointError(f"{source}: architecture '{arch}' is not one of {sorted(ARCHITECTURES)}")
            parts = ARCHITECTURES[arch]
        vision = VisionConfig(**_pick(VisionConfig, d.get("vision_config") or {}))
        text_d = dict(d.get("text_config") or {})
        text_d.setdefault("encoder_hidden_size", vision.hidden_size)
        text = TextConfig(**_pick(TextConfig, text_d))
        return cls(
            vision_config=vision,
            text_config=text,
            image_text_hidden_size=d.get("image_text_hidden_size", 256),
            parts=tuple(parts),
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
    "blip-vqa-capfilt-large": (
        "Salesforce/blip-vqa-capfilt-large",
        _preset("BlipForQuestionAnswering", _large_vision()),
    ),
}


def checkpoints_with(part: str) -> list[str]:
    """Names of the preset checkpoints that have `part` (for errors that say where a capability lives)."""
    return [name for name, (_, cfg) in PRESETS.items() if part in cfg.parts]
