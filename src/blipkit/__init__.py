"""blipkit: BLIP and BLIP-2 in plain PyTorch.

import blipkit
model = blipkit.load("scenes-blip")            # or "Salesforce/blip-itm-base-coco", or a local directory
model.match("photo.jpg", ["a dog", "a cat"])   # ITM probability for every pair
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import shipped_models
from .devices import resolve_device, resolve_dtype
from .errors import BlipkitError, CapabilityError, CheckpointError, InputError

if TYPE_CHECKING:
    from .base import BlipBase

__all__ = ["load", "create", "save", "list_models", "Index", "BlipkitError", "CheckpointError", "InputError",
           "CapabilityError"]
__version__ = "0.1.0"


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


def _path(value: object, what: str) -> str:
    """A name or path argument as a string: a str or os.PathLike, not blank, no NUL character."""
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{what} is a {type(value).__name__}: pass a string or a pathlib.Path")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip() or "\0" in text:
        raise InputError(f"{what} {text!r:.60} is not a usable name or path: pass a model name or a directory")
    return text


def _family(cfg: dict, source: str):
    """(model class, config class) for a config.json dict, by its model_type."""
    from .config import kind_of

    kind = cfg.get("model_type")
    if kind == "blip":
        from .blip import Blip
        from .config import BlipConfig

        return Blip, BlipConfig
    if kind == "blip-2":
        from .blip2 import Blip2
        from .blip2_config import Blip2Config

        return Blip2, Blip2Config
    raise CheckpointError(f"{source}: found a {kind_of(cfg)} checkpoint; blipkit loads BLIP ('blip') and BLIP-2 "
                          "('blip-2') checkpoints (config.json 'model_type')")


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
) -> BlipBase:
    """Load a model: a shipped model name, a local Hub-format directory, a preset name or a Hub repo id.

    Every value of config.json and preprocessor_config.json is checked (type, range, limits) before the model is
    built, and every malformed file is a CheckpointError naming the file and the key.

    Args:
        name_or_path: e.g. "scenes-blip", "./my-checkpoint", "blip-itm-base-coco", "Salesforce/blip-vqa-base".
        device: where the weights go (default: CPU); checked to exist here before anything is read.
        dtype: float32 / bfloat16 / float16 (default: as stored, except that the shipped models, stored in
            float16 to keep the package small, load as float32).
        quantize: "int8" or "bf16" weight-only quantization of the decoding parts (see `blipkit.quantize`);
            a quantized model cannot be saved.

    A directory written by `blipkit export MODEL --format onnx` (it has `onnx.json`) loads as a model whose towers
    run on onnxruntime, with the same methods.
    """
    from . import checkpoint, processing
    from .fields import fail, read_json
    from .quantize import check_mode
    from .quantize import quantize as quantize_weights

    check_mode(quantize)
    if isinstance(name_or_path, (str, Path)) and (Path(name_or_path) / "onnx.json").is_file():
        from .export.runtime import load_onnx

        if device not in (None, "cpu") or dtype is not None or quantize is not None:
            raise InputError(f"{name_or_path} is an ONNX export, which runs on onnxruntime on the CPU as exported: "
                             "drop device / dtype / quantize (int8 is chosen at export: --quantize int8)")
        return load_onnx(Path(name_or_path))

    name = _path(name_or_path, "name_or_path")
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if dtype is None and name in shipped_models():
        dtype = torch.float32
    presets = {k: v[0] for k, v in _presets().items()}
    directory = checkpoint.resolve(name, shipped_models(), presets)
    raw = checkpoint.read_config(directory)
    model_cls, config_cls = _family(raw, str(directory / "config.json"))
    config = config_cls.from_hf(raw, source=str(directory / "config.json"))
    pre = directory / "preprocessor_config.json"
    processor = processing.ImageProcessor.from_hf(read_json(pre), source=pre) if pre.is_file() else None
    patch = config.vision_config.patch_size
    if processor is not None and min(processor.size) < patch:
        raise fail(pre, "size", f"is {processor.size}, smaller than the model's {patch}-pixel patches")
    tokenizer = processing.Tokenizer.from_dir(directory)
    vocab = (config.text_config or config.qformer_config).vocab_size
    if tokenizer.vocab_size > vocab:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, more than the {vocab} "
                              "of the model's vocabulary (config.json); restore the checkpoint's tokenizer files")
    with torch.device("meta"):
        model = model_cls(config)
    checkpoint.load_weights(model, directory, dtype, device or "cpu", keep_float32=model.keep_float32)
    model.eval()
    if quantize is not None:
        quantize_weights(model, quantize)
    model.tokenizer = tokenizer
    model.processor = processor or model.default_processor()
    model.name_or_path = name
    return model


def create(preset: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
    """An uninitialised model with a preset's architecture (no weights, no tokenizer): for training or inspection.

    `device` and `dtype` are checked before anything is built.
    """
    presets = _presets()
    if not isinstance(preset, str) or preset not in presets:
        raise InputError(f"unknown preset {preset!r:.60} (known: {', '.join(presets)})")
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    config = presets[preset][1]
    model_cls, _ = _family({"model_type": "blip-2" if "blip2" in preset else "blip"}, preset)
    model = model_cls(config).to(device=device or "cpu", dtype=dtype)
    model.processor = model.default_processor()
    model.name_or_path = preset
    return model


def save(model: BlipBase, directory: str | Path) -> Path:
    """Write `model` as a Hub-format directory that `load` and transformers both read.

    The directory may be new or hold an older save: files of the same names are replaced, others are left. All files
    are written to a staging folder first and then renamed into place, so a failure leaves the directory as it was.
    """
    from . import checkpoint
    from .base import BlipBase

    if not isinstance(model, BlipBase):
        raise InputError(f"save() takes a blipkit model, got a {type(model).__name__}")
    if getattr(model, "quantized", None):
        raise InputError(f"{model.name_or_path} has {model.quantized[0]} weights, which save() does not write: save "
                         "the float model and load it with quantize=... instead")
    target = Path(_path(directory, "directory"))

    def write(staging: Path) -> None:
        checkpoint.save_weights(model, staging)
        (staging / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save(staging)
        if model.processor is not None:
            (staging / "preprocessor_config.json").write_text(json.dumps(model.processor.to_hf(), indent=2))

    return checkpoint.write_directory(target, write)


def __getattr__(name: str):
    """`blipkit.Index` is imported on first use, so `import blipkit` stays light (no Lance, no pyarrow)."""
    if name == "Index":
        from .collections.index import Index

        return Index
    raise AttributeError(f"module 'blipkit' has no attribute '{name}'")
