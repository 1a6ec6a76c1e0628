"""Inputs as people give them: image files, folders and glob patterns; texts as arguments or one per line in a file."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..processing.tokenizer import is_blank

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_paths(specs: str | Path | Sequence[str | Path], recursive: bool = False) -> list[Path]:
    """Image files named by `specs`: files as given, folders' image files (sorted), glob patterns' matches (sorted).

    Raises InputError for a path that does not exist, a folder or pattern without images, or no specs at all.
    """
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    if not specs:
        raise InputError("no images given: pass image files, folders or glob patterns")
    out: list[Path] = []
    for spec in specs:
        text = str(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir()) if _is_image(p))
            if not found:
                raise InputError(f"folder '{text}' holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif path.is_file():
            out.append(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image(Path(p)))
            if not found:
                raise InputError(f"pattern '{text}' matches no image files")
            out += found
        else:
            raise InputError(f"image path '{text}' does not exist: check the path")
    return out


def check_text(text: str, what: str = "text") -> str:
    """`text` when it has something visible and is valid Unicode; else InputError naming `what`."""
    if not isinstance(text, str):
        raise InputError(f"{what} is a {type(text).__name__}: pass a string")
    bad = next((c for c in text if 0xD800 <= ord(c) <= 0xDFFF), None)
    if bad is not None:  # what Python makes of bytes that are not UTF-8 (command lines, file names)
        raise InputError(f"{what} {text!r:.60} is not valid UTF-8 (it holds {bad!r}): pass UTF-8 text")
    if is_blank(text):
        raise InputError(f"{what} {text!r:.60} is blank: every text needs some words")
    return text


def read_texts(texts: Sequence[str] | None = None, file: str | Path | None = None, what: str = "texts") -> list[str]:
    """Texts given directly plus one per non-blank line of `file` (UTF-8), in that order; at least one."""
    out = [t for t in (texts or [])]
    if file is not None:
        path = Path(file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as e:
            raise InputError(f"{what} file '{file}' does not exist: check the path") from e
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read {what} file '{file}' ({e}): give a UTF-8 text file, one per line") from e
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise InputError(f"{what} file '{file}' has no {what}: write one per line")
        out += from_file
    for i, text in enumerate(out):
        check_text(text, f"{what} number {i + 1}" if len(out) > 1 else what.rstrip("s"))
    if not out:
        raise InputError(f"no {what} given: pass them as arguments or in a file, one per line")
    return out
