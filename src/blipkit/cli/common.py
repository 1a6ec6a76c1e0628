"""What the command modules share: a parser whose errors are one line, option types checked at the parser, output
paths checked before the work starts, and the writer of bulk results.

Bulk commands (match, classify, caption, ask) write each image's result as soon as it is computed: a readable line
(or block), or with --json one JSON object per line. An image that cannot be read is skipped with a one-line warning
on stderr (and a `{"image", "error"}` line with --json); at the end the bad images are listed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..errors import InputError

MAX_SEED = 2**32 - 1  # numpy's seeds end here
MAX_BATCH = 65536
MAX_BEAMS = 64
MAX_NEW_TOKENS = 4096  # above every model's position table; the model checks its own
MAX_CAPTIONS = 100
# options holding texts the model reads (everything else that is a string names a file, a model or a choice)
TEXT_OPTIONS = ("texts", "labels", "answers", "question", "template", "prompt", "phrases", "words", "text")


class ParserError(InputError):
    """A command line argparse could not take; `prog` is the (sub)command it was reading."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (one line from `main`) instead of printing the usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise ParserError with argparse's message and where to look."""
        raise ParserError(f"{message} (see `{self.prog} --help`)", self.prog)


def write_line(text: str, stream: TextIO | None = None) -> None:
    """`text` and a newline on `stream` (stdout), flushed; characters the stream cannot encode (such as the lone
    surrogates of non-UTF-8 file names) are written as backslash escapes, which JSON reads back as the same text."""
    stream = stream or sys.stdout
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding) + "\n")
    stream.flush()


def one_line(error: BaseException | str) -> str:
    """An error message on one line."""
    return " ".join(str(error).split())


# ------------------------------------------------------------------------------------------------- option types


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high] (either end open when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {_range(low, high)}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, high] when `above`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = low is not None and (value <= low if above else value < low)
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {_range(low, high, above)}")
        return value

    parse.__name__ = "number"
    return parse


def _range(low: float | None, high: float | None, above: bool = False) -> str:
    if low is not None and high is not None:
        return f"{'more than ' + str(low) + ' and at most' if above else str(low) + ' to'} {high}"
    if low is not None:
        return f"{'more than' if above else 'at least'} {low}"
    return f"at most {high}" if high is not None else "a finite number"


def check_texts(args: argparse.Namespace) -> None:
    """Every text option (not file names) checked at the door: something visible, valid Unicode."""
    from ..tasks.inputs import check_text

    for dest in TEXT_OPTIONS:
        value = getattr(args, dest, None)
        texts = value if isinstance(value, list) else [] if value is None else [value]
        name = {"phrases": "phrase", "words": "text"}.get(dest, "--" + dest)
        for i, text in enumerate(texts):
            check_text(text, name if len(texts) == 1 else f"{name} number {i + 1}")


# ------------------------------------------------------------------------------------------------- outputs


def check_output(path: str, flag: str, inputs: Sequence[Path] = (), suffix: str | None = None) -> Path:
    """The file an option will write, checked before any work: its folder exists and is writable, it is not a folder
    and not one of the `inputs`. Raises InputError naming the option and the path."""
    out = Path(path).expanduser()
    if suffix is not None and out.suffix.lower() != suffix:
        raise InputError(f"{flag} '{path}': give a path ending in {suffix}")
    if out.is_dir():
        raise InputError(f"{flag} '{path}' is a folder: give a file path inside it")
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist (create it first)"
        raise InputError(f"{flag} '{path}': the folder '{folder}' {what}")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise InputError(f"{flag} '{path}': cannot write there (no permission); choose another path")
    for given in inputs:
        if out.exists() and Path(given).exists() and out.samefile(given):
            raise InputError(f"{flag} '{path}' is an input of this command and would be overwritten: choose "
                             f"another path")
    return out


def check_output_dir(path: str, flag: str) -> Path:
    """A folder an option will create or write into, checked before any work (see `check_output`)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} '{path}' is a file: give a folder (it is created when missing)")
    existing = next(p for p in (out, *out.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise InputError(f"{flag} '{path}': '{existing}' is a file, so the folder cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} '{path}': cannot write in '{existing}' (no permission); choose another folder")
    return out


# ------------------------------------------------------------------------------------------------- bulk results


class Bulk:
    """The results of a bulk command, written as they are computed; images that cannot be read are skipped.

    With one image given, a bad image is an error (exit status 2) as for any other input; with several, each bad
    one gets a warning and the rest go on, and `finish` lists them and returns exit status 1.
    """

    def __init__(self, args: argparse.Namespace, paths: Sequence[Path]) -> None:
        self.command, self.json, self.paths = args.command, args.json, list(paths)
        self.failed: list[Path] = []

    def images(self, model: Any, size: int) -> Iterator[tuple[list[Path], Any]]:
        """Batches of at most `size` readable images: (their paths, their pixels (N, 3, H, W))."""
        import torch

        from ..tasks.common import batched

        for chunk in batched(self.paths, size, None, self.command):
            good, pixels = [], []
            for path in chunk:
                try:
                    pixels.append(model.pixels([path]))
                except InputError as e:
                    self.fail(path, e)
                    continue
                good.append(path)
            if good:
                yield good, torch.cat(pixels)

    def fail(self, path: Path, error: InputError) -> None:
        """Skip `path` with a warning (or raise `error` when it is the only image)."""
        if len(self.paths) == 1:
            raise error
        self.failed.append(path)
        write_line(f"blipkit {self.command}: skipped {path}: {one_line(error)}", sys.stderr)
        if self.json:
            self.write({"image": str(path), "error": one_line(error)}, "")

    def write(self, record: dict[str, Any], text: str) -> None:
        """One result: `record` as a JSON line with --json, else `text`."""
        import json

        write_line(json.dumps(record, ensure_ascii=False) if self.json else text)

    def finish(self) -> int:
        """The exit status: 0, or 1 after listing the images that could not be read."""
        if not self.failed:
            return 0
        names = ", ".join(str(p) for p in self.failed[:5]) + (", ..." if len(self.failed) > 5 else "")
        write_line(f"blipkit {self.command}: {len(self.failed)} of {len(self.paths)} images could not be read and "
                   f"have no result: {names}", sys.stderr)
        return 1


def add_commit_seconds(p, default: float | None = None) -> None:
    """--commit-seconds (local executor): how far apart results are committed (None: the engine's default)."""
    from ..collections.engine import COMMIT_SECONDS

    p.add_argument("--commit-seconds", type=number(0, 86400), default=default,
                   help=f"commit results at least this far apart (default {COMMIT_SECONDS:g}; 0: every batch); a kill "
                        "loses at most that much work")
