"""Grounding a phrase: GradCAM over one cross-attention layer of the ITM encoder, and a box from the map.

    from blipkit.tasks import ground
    g = ground(model, "scene.png", "the red circle")
    g.box          # [x1, y1, x2, y2], normalised to [0, 1] (x to the right, y down)
    g.cam.token_maps, g.cam.phrase_map   # per-token maps (T, gh, gw) and the whole-phrase map (gh, gw)

GradCAM (as in ALBEF / BLIP): run the ITM head on (image, phrase) with the chosen layer's cross-attention recorded,
take the gradient of the "match" logit with respect to the attention probabilities, and average over heads the
attention times its positive gradient. BLIP gives one map per text token; the phrase map (`source="phrase"`) is the
mean over the word tokens ([CLS] / [ENC] and [SEP] left out), or (`source="itm"`) the map of the first token, the
position whose output the ITM head reads (LAVIS returns both: the first and the mean). BLIP-2 does the same over the
Q-Former's cross-attention, where the rows are its query tokens, all of which the ITM head reads: the phrase map is
their mean with either source. The default layer is `attention.default_layer`, the default source the model's entry
in `attention.MODEL_SOURCES`, else "phrase".

The peak is the centre of the phrase map's highest cell (patch). The box: the map is upsampled bilinearly
(`UPSAMPLE` times per patch), cut at `threshold` (default 0.5) of its maximum; the box is the bounding box of the
connected region (4-neighbours) grown from the peak cell's highest point. A map without any positive value gives the
whole image. (The peak of the upsampled map itself is no better: where the highest cell lies on the border, the
upsampled map is flat out to the image edge, and its first maximum lies on the edge, half a patch off the cell.)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import BlipBase
from ..errors import CapabilityError, InputError
from ..generate import check_int
from ..layers import recording
from .attention import (
    GROUND_STACKS,
    SPECIAL_TOKENS,
    find_stack,
    patch_grid,
    query_labels,
    resolve_layer,
    resolve_source,
    single_image,
    text_tokens,
)
from .render import as_pil, grid_shape, new_figure, overlay, save, show_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THRESHOLD = 0.5  # fraction of the map's maximum that belongs to the object
UPSAMPLE = 8  # map cells per patch side before thresholding: boxes finer than the patch grid
MAX_UPSAMPLE = 64
BOX_COLOURS = ("#ff2d2d", "#1e90ff", "#ffd700", "#32cd32", "#ff8c00", "#da70d6", "#00ced1", "#ffffff")


@dataclass
class GradCAM:
    """GradCAM maps of one image and text: per token (or BLIP-2 query) and for the whole phrase."""

    tokens: list[str]
    token_maps: Tensor  # (T, gh, gw), heads averaged
    phrase_map: Tensor  # (gh, gw)
    layer: int
    part: str
    itm_logit: float  # the "match" logit that was differentiated
    match: float  # ITM match probability
    source: str = "phrase"  # which rows make the phrase map: "phrase" (the words) or "itm" (what the ITM head reads)

    def to_dict(self, maps: bool = True) -> dict[str, Any]:
        """JSON-ready fields (maps as nested lists when `maps`)."""
        out: dict[str, Any] = {"part": self.part, "layer": self.layer, "source": self.source, "tokens": self.tokens,
                               "itm_logit": self.itm_logit, "match": self.match}
        if maps:
            out["phrase_map"] = self.phrase_map.tolist()
            out["token_maps"] = self.token_maps.tolist()
        return out


@dataclass
class Grounding:
    """Where a phrase is in an image: a normalised box, the map's peak, the match probability, and the maps."""

    phrase: str
    box: list[float]  # [x1, y1, x2, y2] in [0, 1]
    peak: list[float]  # [x, y] in [0, 1]
    cam: GradCAM

    @property
    def match(self) -> float:
        """ITM match probability of image and phrase."""
        return self.cam.match

    def to_dict(self, maps: bool = False) -> dict[str, Any]:
        """JSON-ready fields; the GradCAM maps only when `maps`."""
        out = {"phrase": self.phrase, "box": self.box, "peak": self.peak, "match": self.match, "layer": self.cam.layer,
               "source": self.cam.source}
        return {**out, "gradcam": self.cam.to_dict(maps)} if maps else out


def gradcam(model: BlipBase, image: Any, text: str, layer: int | None = None, source: str | None = None) -> GradCAM:
    """GradCAM of the ITM "match" logit over the cross-attention of `layer`, its phrase map from `source` (see the
    module docstring).

    The gradients are taken here, whatever autograd mode the caller is in, with respect to the recorded attention
    only (no parameter's `.grad` changes); the maps returned are plain tensors.
    """
    part, stack = find_stack(model, GROUND_STACKS, "ground")
    layer = resolve_layer(model, stack, layer, part)
    source = resolve_source(model, source)
    _, pixels = single_image(model, image)
    if part == "text_encoder":
        enc = model.tokenizer.enc_token_id if getattr(model, "enc_token", False) else None
        _, _, tokens = text_tokens(model, text, enc)
    elif not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    qkv = stack.layer[layer].crossattention.qkv
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            feats = model.vision_model(pixels)  # (1, 1 + P, W): forward_itm takes features; the ViT needs no graph
        feats.requires_grad_(True)  # a graph up to the attention even when every weight is frozen
        with recording(qkv) as record:  # this call's own record: other threads on the model are not seen
            logits = model.forward_itm(feats, [text])[0, 0]  # (2,); itm_logits runs without autograd
        probs = record[qkv]
        if probs is None or not probs.requires_grad:
            raise CapabilityError(f"{part} layer {layer}: the ITM pass recorded no differentiable attention")
        (grad,) = torch.autograd.grad(logits[1], probs)
    cam = (probs.detach() * grad.clamp(min=0))[0].float().mean(dim=0).cpu()  # (T, 1 + P), heads averaged
    gh, gw = patch_grid(model, pixels, cam.shape[-1])
    token_maps = cam[:, 1:].reshape(-1, gh, gw)
    if part == "qformer":
        tokens = query_labels(token_maps.shape[0])
        rows = list(range(len(tokens)))  # the ITM head reads every query
    elif source == "itm":
        rows = [0]
    else:
        rows = [i for i, t in enumerate(tokens) if t not in SPECIAL_TOKENS] or list(range(len(tokens)))
    phrase_map = token_maps[rows].mean(dim=0)
    logits = logits.detach().float()
    logit, match = float(logits[1]), float(logits.softmax(-1)[1])
    return GradCAM(tokens, token_maps, phrase_map, layer, part, logit, match, source)


def _component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected region of `mask` that contains `seed` (grown by repeated one-cell dilation)."""
    region = np.zeros_like(mask)
    region[seed] = True
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown


def box_from_map(
    heat: Tensor, threshold: float = THRESHOLD, upsample: int = UPSAMPLE
) -> tuple[list[float], list[float]]:
    """(box [x1, y1, x2, y2], peak [x, y]), normalised to [0, 1], of the region around the map's maximum."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold < 1.0:
        raise InputError(f"threshold={threshold!r:.60}: use a fraction of the map's maximum between 0 and 1")
    upsample = check_int("upsample", upsample, 1, MAX_UPSAMPLE)
    heat = torch.as_tensor(heat).detach().float().clamp(min=0)
    if heat.dim() != 2:
        raise InputError(f"a map is (grid_h, grid_w), got shape {tuple(heat.shape)}")
    if float(heat.max()) <= 0:
        return [0.0, 0.0, 1.0, 1.0], [0.5, 0.5]
    up = F.interpolate(heat[None, None], scale_factor=upsample, mode="bilinear", align_corners=False)[0, 0].numpy()
    h, w = up.shape
    gh, gw = heat.shape
    row, col = divmod(int(heat.argmax()), gw)  # the peak: the centre of the map's highest cell
    block = up[row * upsample:(row + 1) * upsample, col * upsample:(col + 1) * upsample]
    dy, dx = np.unravel_index(int(block.argmax()), block.shape)
    seed = (row * upsample + int(dy), col * upsample + int(dx))  # the region grows from that cell's highest point
    mask = up >= threshold * up.max()
    mask[seed] = True
    region = _component(mask, seed)
    ys, xs = np.nonzero(region)
    box = [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]
    return [round(float(v), 6) for v in box], [round((col + 0.5) / gw, 6), round((row + 0.5) / gh, 6)]


def ground(
    model: BlipBase, image: Any, phrase: str, layer: int | None = None, threshold: float = THRESHOLD,
    source: str | None = None,
) -> Grounding:
    """Box [x1, y1, x2, y2] (normalised to [0, 1]) of `phrase` in one image, from its GradCAM phrase map (`source`:
    "phrase" or "itm", None for the model's default; see the module docstring)."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise InputError(f"phrase {phrase!r} is empty: give the words to find")
    cam = gradcam(model, image, phrase, layer, source)
    box, peak = box_from_map(cam.phrase_map, threshold)
    return Grounding(phrase, box, peak, cam)


def render_grounding(
    groundings: list[Grounding], image: Any, path: str | Path | None = None, tokens: bool = False,
    processor: Any = None,
) -> Figure:
    """The image with every phrase's box, then each phrase's GradCAM map (and, with `tokens`, each token's)."""
    from matplotlib.patches import Rectangle

    picture = as_pil(image, processor)
    w, h = picture.size

    def draw_box(ax, g: Grounding, colour: str) -> Rectangle:
        x1, y1, x2, y2 = g.box[0] * w, g.box[1] * h, g.box[2] * w, g.box[3] * h
        return ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                                      linewidth=2.5, label=g.phrase))

    panels: list[tuple[Grounding, np.ndarray, str, bool]] = []
    for g in groundings:
        panels.append((g, g.cam.phrase_map.numpy(), f"{g.phrase}\nmatch {g.match:.2f}", True))
        if tokens:
            for t, name in enumerate(g.cam.tokens):
                if name not in SPECIAL_TOKENS:
                    panels.append((g, g.cam.token_maps[t].numpy(), name, False))
    nr, nc = grid_shape(len(panels) + 1, max_cols=5)
    fig = new_figure(width=2.6 * nc, height=2.8 * nr + 0.4)
    ax = fig.add_subplot(nr, nc, 1)
    show_image(ax, picture, "boxes")
    handles = [draw_box(ax, g, BOX_COLOURS[i % len(BOX_COLOURS)]) for i, g in enumerate(groundings)]
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8, frameon=False)
    colours = {id(g): BOX_COLOURS[i % len(BOX_COLOURS)] for i, g in enumerate(groundings)}
    for k, (g, heat, title, with_box) in enumerate(panels):
        ax = fig.add_subplot(nr, nc, k + 2)
        overlay(ax, picture, heat, title)
        if with_box:
            draw_box(ax, g, colours[id(g)])
    if groundings:
        fig.suptitle(f"GradCAM, {groundings[0].cam.part} layer {groundings[0].cam.layer}", fontsize=11)
    if path is not None:
        save(fig, path)
    return fig
