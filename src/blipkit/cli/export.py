"""`blipkit export`: a model's towers as ONNX files that `blipkit.load(DIR)` and onnxruntime alone can run."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import InputError
from .common import check_output_dir, write_line

EXAMPLES = """examples:
  blipkit export scenes-blip --format onnx --out scenes-blip-onnx
  blipkit export scenes-blip2-opt --format onnx --out opt-onnx --quantize int8
  blipkit export scenes-blip --format onnx --out vision-only --parts vision_encoder,text_encoder"""


def cmd_export(args: argparse.Namespace) -> int:
    """The `export` command."""
    import blipkit
    from blipkit.export import export_onnx

    if args.quantize not in (None, "int8"):
        raise InputError(f"--quantize {args.quantize}: an ONNX export takes int8 (the decoding towers' weights in "
                         "int8 blocks, onnxruntime's MatMulNBits)")
    if args.dtype not in (None, "float32") or args.device not in (None, "cpu"):
        raise InputError("an ONNX export is written from float32 weights on the CPU: drop --dtype / --device")
    out = check_output_dir(args.out, "--out")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None
    if args.parts is not None and not parts:
        raise InputError("--parts is empty: name towers, e.g. --parts vision_encoder,text_encoder")
    model = blipkit.load(args.source or args.model)
    written = export_onnx(model, out, parts=parts, quantize=args.quantize)
    files = sorted(p.name for p in written.iterdir() if p.suffix == ".onnx")
    write_line(f"wrote {', '.join(files)} and the config, tokenizer and preprocessor files to {written}",
               sys.stdout)
    return 0


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add `export` to `blipkit`'s parser."""
    help_ = "export a model's towers to ONNX (run them with blipkit.load(DIR) or onnxruntime)"
    p = subparsers.add_parser("export", parents=[common], help=help_, description=help_, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default=None, metavar="MODEL",
                   help="model name, directory or Hub id (default: --model)")
    p.add_argument("--format", required=True, choices=["onnx"], help="export format")
    p.add_argument("--out", required=True, help="directory to write (created when missing)")
    p.add_argument("--parts", default=None, help="comma-separated towers (default: every tower the model has)")
    p.set_defaults(func=cmd_export)
