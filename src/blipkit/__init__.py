"""blipkit: BLIP and BLIP-2 in plain PyTorch.

import blipkit
model = blipkit.load("scenes-blip")            # or "Salesforce/blip-itm-base-coco", or a local directory
model.match("photo.jpg", ["a dog", "a cat"])   # ITM probability for every pair
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import BlipkitError, CapabilityError, CheckpointError, InputError

if TYPE_CHECKING:
    from .base import BlipBase

__all__ = ["load", "create", "save", "list_models", "Index", "BlipkitError", "CheckpointError", "InputError",
           "CapabilityError"]
__version__ = "0.1.0"

MODELS_DIR = Path(__file__).parent / "models"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def shipped_models() -> dict[str, Path]:
    """Models trained by this project and installed with the package: name -> directory."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "config.json").is_file()}


def _presets() -> dict[str, tuple[str, object]]:
    from .config import PRESETS

    presets = dict(PRESETS)
    try:
        from .blip2_config import PRESETS as PRESETS2
    except ImportError:
        PRESETS2 = {}
    presets.update(PRESETS2)
    return presets


def list_models() -> list[str]:
    """Names `load` and `create` accept: shipped models first, then the Salesforce presets."""
    return list(shipped_models()) + list(_presets())


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}' (use one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _family(cfg: dict, source: str):
    """(model class, config class) for a config.json dict, by its model_type."""
    kind = cfg.get("model_type")
    if kind == "blip":
        from .blip import Blip
        from .config import BlipConfig

        return Blip, BlipConfig
    if kind == "blip-2":
        from .blip2 import Blip2
        from .blip2_config import Blip2Config

        return Blip2, Blip2Config
    found = kind or (cfg.get("architectures") or ["<no model_type>"])[0]
    raise CheckpointError(f"{source}: found a '{found}' checkpoint; blipkit loads BLIP ('blip') and BLIP-2 ('blip-2')")


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
) -> BlipBase:
    """Load a model: a shipped model name, a local Hub-format directory, a preset name or a Hub repo id.

    Args:
        name_or_path: e.g. "scenes-blip", "./my-checkpoint", "blip-itm-base-coco", "Salesforce/blip-vqa-base".
        device: where the weights go (default: CPU).
        dtype: float32 / bfloat16 / float16 (default: as stored, except that the shipped models, stored in
            float16 to keep the package small, load as float32).
        quantize: "int8" or "bf16" weight-only quantization of the decoding parts (see `blipkit.quantize`);
            a quantized model cannot be saved.
    """
    from . import checkpoint, processing
    from .quantize import check_mode
    from .quantize import quantize as quantize_weights

    check_mode(quantize)

    dtype = _dtype(dtype)
    if dtype is None and str(name_or_path) in shipped_models():
        dtype = torch.float32
    presets = {k: v[0] for k, v in _presets().items()}
    directory = checkpoint.resolve(name_or_path, shipped_models(), presets)
    raw = checkpoint.read_config(directory)
    model_cls, config_cls = _family(raw, str(directory / "config.json"))
    config = config_cls.from_hf(raw, source=str(directory / "config.json"))
    with torch.device("meta"):
        model = model_cls(config)
    checkpoint.load_weights(model, directory, dtype, device or "cpu", keep_float32=model.keep_float32)
    model.eval()
    if quantize is not None:
        quantize_weights(model, quantize)
    model.tokenizer = processing.Tokenizer.from_dir(directory)
    pre = directory / "preprocessor_config.json"
    model.processor = (
        processing.ImageProcessor.from_hf(json.loads(pre.read_text())) if pre.is_file() else model.default_processor()
    )
    model.name_or_path = str(name_or_path)
    return model


def create(preset: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """An uninitialised model with a preset's architecture (no weights, no tokenizer): for training or inspection."""
    presets = _presets()
    if preset not in presets:
        raise InputError(f"unknown preset '{preset}' (known: {', '.join(presets)})")
    config = presets[preset][1]
    model_cls, _ = _family({"model_type": "blip-2" if "blip2" in preset else "blip"}, preset)
    model = model_cls(config).to(device=device or "cpu", dtype=_dtype(dtype))
    model.processor = model.default_processor()
    model.name_or_path = preset
    return model


def save(model: BlipBase, directory: str | Path) -> Path:
    """Write `model` as a Hub-format directory that `load` and transformers both read."""
    from . import checkpoint

    if getattr(model, "quantized", None):
        raise InputError(f"{model.name_or_path} has {model.quantized[0]} weights, which save() does not write: save "
                         "the float model and load it with quantize=... instead")
    directory = Path(directory)
    checkpoint.save_weights(model, directory)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save(directory)
    if model.processor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(model.processor.to_hf(), indent=2))
    return directory


def __getattr__(name: str):
    """`blipkit.Index` is imported on first use, so `import blipkit` stays light (no Lance, no pyarrow)."""
    if name == "Index":
        from .collections.index import Index

        return Index
    raise AttributeError(f"module 'blipkit' has no attribute '{name}'")
