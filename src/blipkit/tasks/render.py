"""Pictures for the tasks: matplotlib figures (imported lazily, drawn off-screen), thumbnails, overlays, saving.

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot, so nothing here changes the
caller's matplotlib backend or global state; each render function returns its Figure (a notebook shows it) and writes
a PNG when given a path. matplotlib comes with the `blipkit[plot]` extra.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from torch import Tensor

from ..errors import BlipkitError, InputError
from ..processing import load_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
OVERLAY_CMAP = "jet"  # the usual GradCAM look; alpha keeps the image readable underneath
OVERLAY_ALPHA = 0.5


def new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    """An off-screen matplotlib Figure of `width` x `height` inches (`layout`: e.g. "constrained")."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise BlipkitError("drawing pictures needs matplotlib: pip install 'blipkit[plot]'") from e
    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (parent folders are created)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"output '{path}': pictures are written as PNG, give a path ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    except OSError as e:
        raise InputError(f"cannot write '{path}' ({e.strerror or e}): choose a writable location") from e
    return path


def as_pil(item: Any, processor: Any = None) -> Image.Image:
    """A path or PIL image as RGB, or a preprocessed (3, H, W) tensor de-normalised with the processor's mean/std."""
    if isinstance(item, Tensor):
        x = item.detach().float().cpu()
        x = x[0] if x.dim() == 4 else x
        if processor is not None:
            mean = Tensor(processor.mean)[:, None, None]
            std = Tensor(processor.std)[:, None, None]
            x = x * std + mean
        arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return Image.fromarray(arr)
    return load_image(item)


def thumbnail(image: Image.Image, side: int = 96) -> np.ndarray:
    """The image shrunk to fit `side` x `side`, as an (h, w, 3) uint8 array."""
    thumb = image.copy()
    thumb.thumbnail((side, side), Image.Resampling.BICUBIC)
    return np.asarray(thumb)


def item_name(item: Any, index: int) -> str:
    """A short label for an image input: its file name, else "image i"."""
    if isinstance(item, (str, Path)):
        return Path(item).name
    return f"image {index}"


def wrap(text: str, width: int = 28, lines: int = 3) -> str:
    """`text` wrapped to `width` columns, at most `lines` lines (an ellipsis marks a cut)."""
    parts = textwrap.wrap(text, width) or [""]
    if len(parts) > lines:
        parts = parts[:lines]
        parts[-1] = parts[-1][: width - 1] + "…"
    return "\n".join(parts)


def show_image(ax: Any, image: Image.Image, title: str | None = None, fontsize: int = 9) -> None:
    """Draw `image` on `ax` in pixel coordinates, without axes."""
    ax.imshow(np.asarray(image))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=fontsize)


def overlay(ax: Any, image: Image.Image, heat: np.ndarray, title: str | None = None, vmax: float | None = None) -> Any:
    """`heat` (gh, gw) stretched over `image` (patch grid over the whole picture), semi-transparent.

    The colours span the map's own minimum to its maximum (or `vmax`); the image underneath is shown in grey, so
    its own colours are not mistaken for heat.
    """
    show_image(ax, image.convert("L").convert("RGB"), title)
    w, h = image.size
    low = float(heat.min())
    top = float(heat.max()) if vmax is None else vmax
    return ax.imshow(
        heat, extent=(0, w, h, 0), cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, interpolation="bilinear",
        vmin=low, vmax=top if top > low else low + 1.0,
    )


def grid_shape(n: int, max_cols: int = 6) -> tuple[int, int]:
    """(rows, cols) of a grid holding `n` panels."""
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols
