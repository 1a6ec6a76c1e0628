"""Write a model's towers as ONNX files, with the config, tokenizer and preprocessor that run them.

A directory written here holds `<tower>.onnx` for each tower (see `towers.py`), `config.json` (the checkpoint's),
`preprocessor_config.json`, the tokenizer files, and `onnx.json`: the format tag, the family and, per tower, its
file and its input / output names. `blipkit.load(DIR)` recognises it by `onnx.json` and runs it on onnxruntime.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..errors import InputError
from .towers import towers

FORMAT = "blipkit-onnx"
MANIFEST = "onnx.json"
OPSET = 17
QUANTIZE = ("int8",)


def _require(module: str) -> None:
    """Raise InputError naming the extra to install when an optional ONNX package is missing."""
    try:
        __import__(module)
    except ImportError:
        raise InputError(f"ONNX export needs the '{module}' package: pip install 'blipkit[onnx]'") from None


def export_onnx(model, out: str | Path, parts: list[str] | None = None, quantize: str | None = None) -> Path:
    """Export `model`'s towers (all, or `parts`) to `out` as ONNX, with what `blipkit.load(out)` needs to run them.

    Args:
        model: a float model from `blipkit.load` (not quantized with quantize=...).
        out: the directory to write (created; files of the same names are replaced).
        parts: tower names, e.g. ["vision_encoder", "qformer"]; default: every tower the checkpoint has.
        quantize: "int8" for onnxruntime's dynamic int8 quantization of the weights (MatMul / Gemm).
    """
    _require("onnx")
    if quantize is not None and quantize not in QUANTIZE:
        raise InputError(f"unknown ONNX quantization {quantize!r}: use one of {', '.join(QUANTIZE)}")
    if getattr(model, "quantized", None):
        raise InputError(f"{model.name_or_path} has {model.quantized[0]} weights: export the float model (load it "
                         "without quantize=) and pass --quantize to the export instead")
    if quantize is not None:
        _require("onnxruntime")
    found = towers(model, parts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "family": model.family, "quantize": quantize, "towers": {}}
    model.eval()
    for name, tower in found.items():
        path = out / f"{name}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic; the graphs keep their dynamic axes
            torch.onnx.export(tower.module, tower.inputs, str(path), input_names=tower.input_names,
                              output_names=tower.output_names, dynamic_axes=tower.dynamic_axes, opset_version=OPSET,
                              dynamo=False)
        if quantize == "int8":
            _quantize_file(path)
        manifest["towers"][name] = {"file": path.name, "inputs": tower.input_names, "outputs": tower.output_names}
    (out / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save(out)
    if model.processor is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(model.processor.to_hf(), indent=2))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _quantize_file(path: Path) -> None:
    """Replace an ONNX file by its onnxruntime dynamic int8 quantization (weights int8, activations per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    tmp.replace(path)
