"""Cross-attention maps: where each text token (BLIP) or query token (BLIP-2) looks in the image, layer by layer.

    from blipkit.tasks import cross_attention_maps, render_attention
    maps = cross_attention_maps(model, "scene.png", "a red circle left of a blue square", layer=2)
    maps.maps.shape          # (tokens, heads, grid_h, grid_w): attention to each image patch
    maps.cls.shape           # (tokens, heads): attention to the image's class token, kept apart
    render_attention(maps.suppress_common(), "scene.png", "attention.png")

Which stack is read: BLIP's image-grounded text encoder (`text_encoder`, present in ITM and VQA checkpoints), else
its text decoder (captioning checkpoints, prompt starting with [DEC]); BLIP-2's Q-Former, through the queries (with
a text, the ITM pass where queries and text interact; without, the image-only pass of `qformer_features`).
The patch grid comes from the pixels the model actually saw (height / patch size, width / patch size).

Layers are indices into that stack; only layers with cross-attention have maps (every layer in BLIP, every
`cross_attention_frequency`-th in the Q-Former). The default is the model's entry in `MODEL_LAYERS` (scenes-blip:
layer 2 of 4), else the cross-attention layer nearest the middle of the stack (`num_layers // 2`, ties to the lower,
the last layer only if nothing else has cross-attention): layer 6 of BLIP-base's 12 (as LAVIS's GradCAM), layer 6 of
the Q-Former's 12, layer 0 of a 2-layer stack.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..base import BlipBase
from ..errors import CapabilityError, InputError
from ..generate import check_flag
from ..layers import recording
from ..text import TextEncoder
from .common import as_items
from .render import as_pil, grid_shape, new_figure, overlay, save, show_image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STACKS = ("text_encoder", "qformer", "text_decoder")  # parts whose text stack cross-attends to the image
GROUND_STACKS = ("text_encoder", "qformer")  # the stacks of the ITM pass, which GradCAM differentiates
# Default layers of models where the middle one is not the best, by model name (or checkpoint folder name).
# scenes-blip: layer 2 of 4 (the middle one, named here because it was measured: with the ITM position's map its
# GradCAM peak falls on the named object for 80.6 % of the first 150 validation scenes' phrases, against 74.5 / 65.3 /
# 38.1 % at layers 3 / 1 / 0; docs/tasks.md).
MODEL_LAYERS: dict[str, int] = {"scenes-blip": 2}
# grounding's phrase map per model where the validation split chose the ITM position over the words (grounding.py;
# scenes-blip at layer 2: 80.6 % against 64.3 %)
MODEL_SOURCES: dict[str, str] = {"scenes-blip": "itm"}
SOURCES = ("phrase", "itm")
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[ENC]", "[DEC]", "[MASK]")


def find_stack(model: BlipBase, parts: tuple[str, ...] = STACKS, capability: str = "attention") -> tuple[str, Any]:
    """(part name, its text stack) of the first of `parts` the model has: the layers that look at the image.

    A model without `capability` ("attention", or "ground" with `GROUND_STACKS`) is refused first.
    """
    model.require(capability)
    for part in parts:
        if model.has(part):
            stack = next((m for m in getattr(model, part).modules() if isinstance(m, TextEncoder)), None)
            if stack is not None:
                return part, stack
    raise CapabilityError(f"{model.name_or_path}: no text stack with cross-attention in {', '.join(parts)}")


def cross_layers(stack: Any) -> list[int]:
    """Indices of the stack's layers that have cross-attention."""
    return [i for i, layer in enumerate(stack.layer) if getattr(layer, "has_cross", False)]


def model_name(model: BlipBase) -> str:
    """The key of `MODEL_LAYERS` / `MODEL_SOURCES` a model matches: its name, or its checkpoint folder's name."""
    return Path(str(model.name_or_path)).name


def default_layer(model_or_stack: Any) -> int:
    """The layer grounding and attention maps read unless told: the model's entry in `MODEL_LAYERS`, else the
    cross-attention layer nearest the middle (`num_layers // 2`, ties to the lower), never the last one.

    Takes a model (its first stack in `STACKS`) or a text stack. In the last layer only the first position's
    cross-attention reaches BLIP's ITM head (which reads that position alone), so word tokens would get no GradCAM.
    """
    if isinstance(model_or_stack, BlipBase):
        name = model_name(model_or_stack)
        if name in MODEL_LAYERS:
            return MODEL_LAYERS[name]
        stack = find_stack(model_or_stack)[1]
    else:
        stack = model_or_stack
    layers = cross_layers(stack)
    layers = [i for i in layers if i != len(stack.layer) - 1] or layers
    middle = len(stack.layer) // 2
    return min(layers, key=lambda i: (abs(i - middle), i))


def resolve_source(model: BlipBase, source: str | None) -> str:
    """Grounding's `source` checked ("phrase" or "itm"); None gives the model's entry in `MODEL_SOURCES`, else
    "phrase"."""
    if source is None:
        return MODEL_SOURCES.get(model_name(model), "phrase")
    if source not in SOURCES:
        raise InputError(f"source={source!r:.60}: use 'phrase' (the map of the phrase's words) or 'itm' (the map of "
                         "the position the ITM head reads)")
    return source


def resolve_layer(model: BlipBase, stack: Any, layer: int | None, part: str = "the text stack") -> int:
    """`layer` checked against the model's stack (negative counts from the end); None gives `default_layer`."""
    layers = cross_layers(stack)
    if not layers:
        raise CapabilityError(f"{part} has no cross-attention layers")
    if layer is None:
        chosen = MODEL_LAYERS.get(model_name(model))
        return chosen if chosen in layers else default_layer(stack)
    n = len(stack.layer)
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not -n <= layer < n:
        raise InputError(f"layer {layer} does not exist: {part} has layers 0..{n - 1} (cross-attention in "
                         f"{', '.join(map(str, layers))})")
    index = int(layer) % n
    if index not in layers:
        raise InputError(f"layer {layer} of {part} has no cross-attention: use one of {', '.join(map(str, layers))}")
    return index


def patch_grid(model: BlipBase, pixels: Tensor, keys: int) -> tuple[int, int]:
    """(grid_h, grid_w) of the patches behind `keys` attention keys (class token + patches) for these pixels."""
    patch = model.config.vision_config.patch_size
    gh, gw = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    if gh * gw == keys - 1:
        return gh, gw
    side = int(round((keys - 1) ** 0.5))
    if side * side == keys - 1:
        return side, side
    raise CapabilityError(f"cannot lay {keys - 1} image keys on a grid (pixels {tuple(pixels.shape[-2:])}, "
                          f"patch {patch})")


def single_image(model: BlipBase, image: Any) -> tuple[Any, Tensor]:
    """(the image item, its pixels (1, 3, H, W)) for tasks that take exactly one image."""
    items = as_items(image)
    if len(items) != 1:
        raise InputError(f"this task takes one image at a time, got {len(items)}")
    return items[0], model.pixels(items[0])


def text_tokens(model: BlipBase, text: str, first: int | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """(ids (1, T), mask (1, T), token strings) of `text` as the model's stack reads it; `first` replaces token 0."""
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    ids, mask = model.tokens([text], max_length=model.config.text_config.max_position_embeddings)
    if first is not None:
        ids = ids.clone()
        ids[:, 0] = first
    backend = model.tokenizer.backend
    return ids, mask, [backend.id_to_token(int(i)) or f"<{int(i)}>" for i in ids[0]]


def query_labels(n: int) -> list[str]:
    """Row labels of BLIP-2's query tokens."""
    return [f"query {i}" for i in range(n)]


@dataclass
class AttentionMaps:
    """Cross-attention weights of one layer for one image: rows are tokens (text tokens, or BLIP-2 queries)."""

    tokens: list[str]
    maps: Tensor  # (T, nh, gh, gw) attention to each patch
    cls: Tensor  # (T, nh) attention to the image's class token
    layer: int
    part: str
    special: list[bool] = field(default_factory=list)  # rows that are special tokens ([CLS], [SEP], ...)

    def mean_heads(self) -> Tensor:
        """Maps averaged over heads (T, gh, gw)."""
        return self.maps.mean(dim=1)

    def suppress_common(self) -> AttentionMaps:
        """Maps minus their per-patch minimum over tokens (per head): what is common to every token goes away."""
        maps = self.maps - self.maps.amin(dim=0, keepdim=True)
        return AttentionMaps(self.tokens, maps, self.cls, self.layer, self.part, list(self.special))

    def words(self) -> list[int]:
        """Indices of the rows that are not special tokens."""
        return [i for i, s in enumerate(self.special) if not s] or list(range(len(self.tokens)))

    def peak(self, index: int) -> tuple[float, float]:
        """Normalised (x, y) of the centre of the patch where row `index` (heads averaged) attends most."""
        heat = self.mean_heads()[index]
        gh, gw = heat.shape
        flat = int(heat.flatten().argmax())
        return ((flat % gw + 0.5) / gw, (flat // gw + 0.5) / gh)

    def to_dict(self, maps: bool = True) -> dict[str, Any]:
        """JSON-ready: tokens, shape, layer, per-token peaks, and (optionally) the maps as nested lists."""
        out: dict[str, Any] = {
            "part": self.part,
            "layer": self.layer,
            "tokens": self.tokens,
            "special": self.special,
            "shape": list(self.maps.shape),
            "peaks": [list(self.peak(i)) for i in range(len(self.tokens))],
        }
        if maps:
            out["maps"] = self.maps.tolist()
            out["cls"] = self.cls.tolist()
        return out


def _read_stack(model: BlipBase, part: str, pixels: Tensor, text: str | None) -> tuple[list[str], list[bool]]:
    """Run the pass whose cross-attention the maps show; returns the rows' tokens and which are special (BLIP)."""
    if part == "qformer":
        if text is not None and model.can("itm"):
            model.itm_logits(pixels, [text])
        else:
            model.qformer_features(pixels)
        return [], []
    feats = model.image_features(pixels)
    if part == "text_encoder":
        enc = model.tokenizer.enc_token_id if getattr(model, "enc_token", False) else None
        ids, mask, tokens = text_tokens(model, text, enc)
        model.text_encoder(ids, mask, context=feats)
    else:  # captioning checkpoints: the decoder reads [DEC] + the text
        ids, mask, tokens = text_tokens(model, text, model.config.text_config.bos_token_id)
        model.text_decoder(ids, attention_mask=mask, context=feats)
    return tokens, [t in SPECIAL_TOKENS for t in tokens]


@torch.no_grad()  # not inference_mode: the maps returned are ordinary tensors
def cross_attention_maps(
    model: BlipBase, image: Any, text: str | None = None, layer: int | None = None, suppress_common: bool = False
) -> AttentionMaps:
    """Raw cross-attention weights of `layer` for one image (and text), shaped (tokens, heads, grid_h, grid_w).

    Args:
        image: a path, PIL image or (3, H, W) tensor.
        text: what the text stack reads (BLIP needs one; for BLIP-2 it is optional, see the module docstring).
        layer: index into the stack (default: `default_layer`); must have cross-attention.
        suppress_common: subtract each patch's minimum over tokens (see `AttentionMaps.suppress_common`).
    """
    check_flag("suppress_common", suppress_common)
    part, stack = find_stack(model)
    layer = resolve_layer(model, stack, layer, part)
    _, pixels = single_image(model, image)
    if part != "qformer" and text is None:
        raise InputError("BLIP cross-attention maps need a text: pass the words to look for")
    qkv = stack.layer[layer].crossattention.qkv
    with recording(qkv) as record:  # this call's own record: other threads on the model are not seen
        tokens, special = _read_stack(model, part, pixels, text)
    probs = record[qkv]
    if probs is None:
        raise CapabilityError(f"{part} layer {layer} recorded no attention: its cross-attention did not run")
    if part == "qformer":
        tokens, special = query_labels(probs.shape[2]), [False] * probs.shape[2]
    probs = probs[0].float().cpu()  # (nh, T, 1 + P)
    gh, gw = patch_grid(model, pixels, probs.shape[-1])
    maps = probs[..., 1:].reshape(probs.shape[0], probs.shape[1], gh, gw).transpose(0, 1)  # (T, nh, gh, gw)
    out = AttentionMaps(tokens, maps.contiguous(), probs[..., 0].t().contiguous(), layer, part, special)
    return out.suppress_common() if suppress_common else out


def render_attention(
    maps: AttentionMaps,
    image: Any,
    path: str | Path | None = None,
    heads: bool = False,
    words_only: bool = True,
    processor: Any = None,
) -> Figure:
    """A grid of per-token overlays on the image (heads averaged); with `heads`, one row per token and head columns.

    Each panel is scaled to its own maximum, printed in its title, so weak rows stay readable.
    """
    picture = as_pil(image, processor)
    rows = maps.words() if words_only else list(range(len(maps.tokens)))
    title = f"{maps.part} layer {maps.layer} cross-attention"
    if heads:
        nh = maps.maps.shape[1]
        fig = new_figure(width=1.9 * (nh + 2), height=2.0 * len(rows) + 0.6)
        for r, t in enumerate(rows):
            panels = [(maps.mean_heads()[t], "mean")] + [(maps.maps[t, h], f"head {h}") for h in range(nh)]
            ax = fig.add_subplot(len(rows), nh + 2, r * (nh + 2) + 1)
            ax.set_axis_off()
            ax.text(0.95, 0.5, maps.tokens[t], ha="right", va="center", fontsize=12, transform=ax.transAxes)
            for c, (heat, name) in enumerate(panels):
                ax = fig.add_subplot(len(rows), nh + 2, r * (nh + 2) + c + 2)
                overlay(ax, picture, heat.numpy(), f"{name} · max {float(heat.max()):.3g}")
    else:
        n = len(rows) + 1
        nr, nc = grid_shape(n)
        fig = new_figure(width=2.4 * nc, height=2.5 * nr + 0.5)
        show_image(fig.add_subplot(nr, nc, 1), picture, "image")
        heat = maps.mean_heads()
        for k, t in enumerate(rows):
            ax = fig.add_subplot(nr, nc, k + 2)
            overlay(ax, picture, heat[t].numpy(), f"{maps.tokens[t]}  (max {float(heat[t].max()):.3g})")
    fig.suptitle(title, fontsize=11)
    if path is not None:
        save(fig, path)
    return fig
