"""The `blipkit` command line: one module per group of commands (`tasks`: match, caption, ask ...; `train`: train,
eval), each calling the library's public functions.

Each module in `COMMAND_MODULES` has `add_commands(subparsers, common)` which adds its subcommands with
`parents=[common]` and sets `func(args) -> int` on each. A command line the parser cannot take and errors blipkit
raises on purpose become one line on stderr and exit status 2; nothing else is caught, so real bugs still show their
traceback. Bulk commands that skipped bad images exit with status 1 (see `blipkit.cli.common`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from ..errors import BlipkitError
from .common import Parser, ParserError, check_texts, one_line, write_line

COMMAND_MODULES = ("blipkit.cli.tasks", "blipkit.cli.train", "blipkit.cli.collections", "blipkit.cli.serve",
                   "blipkit.cli.export", "blipkit.cli.capfilt")
DEFAULT_MODEL = "scenes-blip"


def common_parser() -> argparse.ArgumentParser:
    """Flags every subcommand takes."""
    common = Parser(add_help=False)
    common.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name, directory or Hub id (default: {DEFAULT_MODEL})"
    )
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    common.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype")
    common.add_argument("--quantize", default=None, choices=["int8", "bf16"],
                        help="weight-only quantization of the decoder / language model (faster decoding on CPU)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout (match, classify, "
                        "caption, ask: a JSON object per line)")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand."""
    parser = Parser(
        prog="blipkit",
        description="BLIP and BLIP-2: match, classify, caption, answer, ground, attention maps, train, evaluate.",
        epilog="Run `blipkit COMMAND --help` for each command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that part of blipkit is not installed
                continue
            raise
        # a parser of common flags per module: `parents` shares the flags' actions, so one module's set_defaults
        # (collections: --model defaults to the table's model) must not reach the others
        module.add_commands(sub, common_parser())
    return parser


def _compile_progress(args: argparse.Namespace):
    """With --quantize int8, a progress bar while the first call compiles the int8 kernels (see
    `blipkit.quantize.compile_progress`); otherwise nothing."""
    if getattr(args, "quantize", None) != "int8":
        return contextlib.nullcontext()
    from ..quantize import compile_progress

    return compile_progress()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `blipkit` command."""
    try:
        args = build_parser().parse_args(argv)
    except ParserError as e:
        write_line(f"{e.prog}: error: {one_line(e)}", sys.stderr)
        return 2
    try:
        check_texts(args)
        with _compile_progress(args):
            return int(args.func(args) or 0)
    except BlipkitError as e:
        write_line(f"blipkit {args.command}: error: {one_line(e)}", sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blipkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to a reader that stopped early (`| head`): quietly done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
