"""ONNX export and the onnxruntime back end: tensor-in, tensor-out towers (`towers`), the writer (`onnx`), and the
model that runs an exported directory with the same decoding code as the torch models (`runtime`)."""

from .onnx import export_onnx
from .towers import towers

__all__ = ["export_onnx", "towers"]
