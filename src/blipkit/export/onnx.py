"""Write a model's towers as ONNX files, with the config, tokenizer and preprocessor that run them.

A directory written here holds `<tower>.onnx` for each tower (see `towers.py`), `config.json` (the checkpoint's),
`preprocessor_config.json`, the tokenizer files, and `onnx.json`: the format tag, the family, the quantization and,
per tower, its file and its input / output names. `blipkit.load(DIR)` recognises it by `onnx.json` and runs it on
onnxruntime.

With `quantize="int8"` the decoding towers (BLIP's `text_decoder` step, BLIP-2's `language_model` step) store their
weight matrices as int8 in onnxruntime's `MatMulNBits` operator (com.microsoft, 8 bits): blocks of `BLOCK_SIZE`
weights along the input dimension, each with a float32 scale (symmetric, zero point 128 on the stored uint8).
`ACCURACY_LEVEL` 4 lets the kernel quantize each row of activations to int8 per block of the same size and
accumulate in int32 (VNNI / AMX on x86); level 0 keeps float activations but has no fast 8-bit kernel on x86 (slower
than float32 weights here). The vocabulary head stays float32: with it in int8 too, 92 / 100 and 94 / 100 greedy
test captions of the shipped models stayed those of float32, against 95 / 100 and 99 / 100 with it float
(docs/speed.md). The towers run once per image or text (vision, text and image-text encoders, the decoder's
cross-attention projections, the Q-Former) stay float32: on hundreds of rows int8 weights do not pay on the CPU,
and they would move the ITC / ITM scores.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .towers import towers

FORMAT = "blipkit-onnx"
MANIFEST = "onnx.json"
OPSET = 17
QUANTIZE = ("int8",)
INT8_TOWERS = ("text_decoder", "language_model")  # the towers run once per generated token
BLOCK_SIZE = 32  # weights per int8 scale along the input dimension
ACCURACY_LEVEL = 4  # MatMulNBits: 0 float activations, 4 int8 activations per block with int32 accumulation


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
        quantize: "int8": the decoding towers' weight matrices in int8 blocks with float scales (onnxruntime's
            MatMulNBits, see the module docstring); the other towers stay float32.
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
    if quantize == "int8":
        manifest["int8"] = {"method": "weight-only, com.microsoft.MatMulNBits", "bits": 8, "block_size": BLOCK_SIZE,
                            "accuracy_level": ACCURACY_LEVEL, "towers": [n for n in found if n in INT8_TOWERS],
                            "float": "vocabulary head"}
    model.eval()
    for name, tower in found.items():
        path = out / f"{name}.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic; the graphs keep their dynamic axes
            torch.onnx.export(tower.module, tower.inputs, str(path), input_names=tower.input_names,
                              output_names=tower.output_names, dynamic_axes=tower.dynamic_axes, opset_version=OPSET,
                              dynamo=False)
        if quantize == "int8" and name in INT8_TOWERS:
            _quantize_file(path, vocab=model.config.text_config.vocab_size)
        manifest["towers"][name] = {"file": path.name, "inputs": tower.input_names, "outputs": tower.output_names}
    (out / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save(out)
    if model.processor is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(model.processor.to_hf(), indent=2))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _quantize_file(path: Path, vocab: int) -> None:
    """Rewrite an ONNX file with its constant-weight MatMuls as int8 MatMulNBits nodes, all but the vocabulary head
    (the MatMul with `vocab` output columns)."""
    import onnx

    model = onnx.load(str(path))
    weight_only_int8(model, BLOCK_SIZE, ACCURACY_LEVEL, float_columns=(vocab,))
    onnx.save(model, str(path))


def weight_only_int8(model, block_size: int = BLOCK_SIZE, accuracy_level: int = ACCURACY_LEVEL,
                     float_columns: tuple[int, ...] = ()) -> int:
    """Replace, in place, every MatMul of `model` (an onnx.ModelProto) whose second input is a float32 matrix
    initializer by a MatMulNBits node with 8-bit weights; returns how many were replaced. MatMuls with a number of
    output columns in `float_columns` stay float.

    Each output column's weights are cut into blocks of `block_size` along the input dimension (zero-padded at the
    end); a block's scale is its largest magnitude / 127 and its values are stored as round(w / scale) + 128 in uint8,
    the operator's default zero point for 8 bits. (onnxruntime's own `MatMulNBitsQuantizer` writes the same node but
    needs the `onnx-ir` package.)
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    packed: dict[str, tuple[str, str]] = {}
    nodes, replaced = [], 0
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT or w.dims[1] in float_columns:
            nodes.append(node)
            continue
        k, n = w.dims
        if w.name not in packed:
            blocks = -(-k // block_size)
            wt = np.pad(numpy_helper.to_array(w).T, ((0, 0), (0, blocks * block_size - k)))
            wt = wt.reshape(n, blocks, block_size)  # (N, blocks, block_size)
            scale = np.abs(wt).max(-1) / 127
            scale[scale == 0] = 1
            q = (np.clip(np.rint(wt / scale[..., None]), -127, 127) + 128).astype(np.uint8)
            packed[w.name] = (f"{w.name}_int8", f"{w.name}_scales")
            graph.initializer.extend([numpy_helper.from_array(q, packed[w.name][0]),
                                      numpy_helper.from_array(scale.astype(np.float32), packed[w.name][1])])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *packed[w.name]], list(node.output),
                                      name=f"{node.name}_int8", domain="com.microsoft", K=k, N=n, bits=8,
                                      block_size=block_size, accuracy_level=accuracy_level))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {x for node in graph.node for x in node.input}
    kept = [t for t in graph.initializer if t.name in used]  # the float matrices go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced
