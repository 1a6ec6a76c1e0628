"""Feature-space plot: image and/or text ITC embeddings projected to 2-D, drawn with thumbnails and text labels.

    from blipkit.tasks import embedding_space, render_space
    space = embedding_space(model, images=paths, texts=captions, method="tsne")
    space.coords                 # (N, 2) numpy array, images first, then texts
    render_space(space, "space.png")

Projections: t-SNE or PCA from scikit-learn (the `blipkit[plot]` extra), UMAP when umap-learn is installed. "auto"
picks t-SNE, and PCA below `MIN_TSNE` points where t-SNE is meaningless. Image and text embeddings share the ITC
space, so one projection holds both. BLIP-2 image embeddings (one per query) are averaged over queries and
re-normalised first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn.functional as F

from ..base import BlipBase
from ..errors import BlipkitError, InputError
from ..generate import check_int
from .common import as_items, check_choice, encode_images, encode_texts
from .render import as_pil, item_name, new_figure, save, thumbnail, wrap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METHODS = ("auto", "tsne", "pca", "umap")
MIN_TSNE = 5  # fewer points than this are projected with PCA
EXACT_TSNE = 1000  # up to this many points t-SNE computes exact gradients


@dataclass
class Space:
    """2-D coordinates of embeddings with what each point is."""

    coords: np.ndarray  # (N, 2)
    kinds: list[str]  # "image" or "text" per point
    labels: list[str]  # file name or text per point
    items: list[Any]  # the image inputs (paths, PIL images, tensors) and the texts
    method: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready points."""
        points = [{"kind": k, "label": lab, "x": float(x), "y": float(y)}
                  for k, lab, (x, y) in zip(self.kinds, self.labels, self.coords, strict=True)]
        return {"method": self.method, "points": points}


def project(vectors: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(coordinates (N, 2), method used) of `vectors` (N, D); deterministic for a given seed."""
    check_choice(method, METHODS, "method")
    seed = check_int("seed", seed, 0, 2**32 - 1)  # what scikit-learn and umap take
    x = np.asarray(vectors, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        raise InputError(f"a 2-D projection needs at least 2 points, got {n}")
    if method == "auto":
        method = "tsne" if n >= MIN_TSNE else "pca"
    if method == "umap":
        try:
            import umap
        except ImportError as e:
            raise BlipkitError("method 'umap' needs umap-learn (pip install umap-learn); or use 'tsne' / 'pca'") from e
        return umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(x), method
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise BlipkitError("2-D projections need scikit-learn: pip install 'blipkit[plot]'") from e
    if method == "tsne":
        if n < MIN_TSNE:
            raise InputError(f"t-SNE needs at least {MIN_TSNE} points, got {n}: use method 'pca' or 'auto'")
        perplexity = float(min(30, max(2, (n - 1) // 3)))
        exact = n <= EXACT_TSNE  # exact gradients: faster than Barnes-Hut on small sets, and thread-free
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                    method="exact" if exact else "barnes_hut")
        return tsne.fit_transform(x), method
    coords = PCA(n_components=min(2, n, x.shape[1]), random_state=seed).fit_transform(x)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords, method


def embedding_space(
    model: BlipBase,
    images: Any = None,
    texts: Sequence[str] | None = None,
    method: str = "auto",
    seed: int = 0,
    batch_size: int = 32,
    progress: bool | None = None,
) -> Space:
    """ITC embeddings of `images` and/or `texts` projected together to 2-D."""
    check_choice(method, METHODS, "method")
    check_int("seed", seed, 0, 2**32 - 1)
    images = as_items(images) if images is not None else []
    texts = as_items(texts) if texts is not None else []
    if not images and not texts:
        raise InputError("no images and no texts given: pass at least two items to place")
    parts = []
    if images:
        emb = encode_images(model, images, batch_size, progress)
        parts.append(F.normalize(emb.mean(dim=1), dim=-1) if emb.dim() == 3 else emb)
    if texts:
        parts.append(encode_texts(model, texts))
    vectors = np.concatenate([p.cpu().numpy() for p in parts])
    coords, used = project(vectors, method, seed)
    kinds = ["image"] * len(images) + ["text"] * len(texts)
    labels = [item_name(x, i) for i, x in enumerate(images)] + [str(t) for t in texts]
    return Space(coords, kinds, labels, images + texts, used)


def render_space(
    space: Space, path: str | Path | None = None, thumbnails: bool = True, processor: Any = None,
    title: str | None = None,
) -> Figure:
    """Scatter of the 2-D space: images as thumbnails (or dots), texts as labelled dots; PNG at `path`."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig = new_figure(width=9, height=8)
    ax = fig.add_subplot(1, 1, 1)
    xy = space.coords
    is_img = np.array([k == "image" for k in space.kinds])
    n_img = int(is_img.sum())
    if n_img:
        ax.scatter(xy[is_img, 0], xy[is_img, 1], s=25, c="#1f77b4", label="images", zorder=2)
    if (~is_img).any():
        ax.scatter(xy[~is_img, 0], xy[~is_img, 1], s=25, c="#d62728", marker="^", label="texts", zorder=2)
    side = 56 if n_img <= 20 else 40 if n_img <= 60 else 24  # smaller thumbnails where they would pile up
    for i, (kind, label, item) in enumerate(zip(space.kinds, space.labels, space.items, strict=True)):
        if kind == "image" and thumbnails:
            box = OffsetImage(thumbnail(as_pil(item, processor), side), zoom=1.0)
            ax.add_artist(AnnotationBbox(box, xy[i], frameon=True, pad=0.1, bboxprops={"edgecolor": "#1f77b4"}))
        elif kind == "text":
            ax.annotate(wrap(label, 24, 2), xy[i], xytext=(4, 4), textcoords="offset points", fontsize=8,
                        color="#8b0000")
    span = np.ptp(xy, axis=0)
    margin = np.where(span > 0, span * 0.12, 1.0)
    ax.set_xlim(xy[:, 0].min() - margin[0], xy[:, 0].max() + margin[0])
    ax.set_ylim(xy[:, 1].min() - margin[1], xy[:, 1].max() + margin[1])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=9)
    ax.set_title(title or f"embedding space ({space.method})", fontsize=11)
    if path is not None:
        save(fig, path)
    return fig
