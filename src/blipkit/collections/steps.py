"""The indexing step: decoded images -> ITC embeddings (BLIP-2: also its query vectors), and optionally patch
features, a caption and zero-shot labels. One ViT pass per image feeds every column.

Columns (D: the ITC width, Q: BLIP-2's query tokens, 1 + P: class token and patches, W: the ViT width):
- `embedding` (D float32): BLIP's ITC image embedding; BLIP-2's is the normalised mean of its query embeddings
  (one vector for ANN and image-to-image search; text-to-image search uses the query vectors);
- `queries` (BLIP-2 only, Q x D float32): the per-query ITC embeddings, a LanceDB multivector column (MaxSim with one
  text vector is exactly BLIP-2's ITC similarity);
- `features` ((1 + P) * W float16, flattened) with `features=True`: what ITM re-ranking reads;
- `caption` with `caption=True`; `label` and `label_scores` (one score per label, ITC softmax) with `labels`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..base import BlipBase
from ..errors import InputError
from ..tasks.common import encode_texts, itc_scores, require_head, temperature
from ..tasks.zeroshot import DEFAULT_TEMPLATES, prompts
from .decode import Decoded
from .engine import pixels


def fingerprint(model: BlipBase) -> str:
    """A short hash of what decides the embeddings: config, preprocessing and the ITC projection weights."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_hf(), sort_keys=True, default=str).encode())
    if model.processor is not None:
        h.update(json.dumps(model.processor.to_hf(), sort_keys=True).encode())
    for name in ("vision_proj", "vision_projection"):
        if model.has(name):
            h.update(getattr(model, name).weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class EmbedStep:
    """Maps a batch of decoded images to the index columns (see the module docstring)."""

    def __init__(
        self,
        model: BlipBase,
        features: bool = False,
        caption: bool = False,
        labels: Sequence[str] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> None:
        require_head(model, "itc", "index images")
        if caption:
            model.require("caption")
        self.model, self.processor = model, model.processor
        self.features, self.caption = features, caption
        self.labels = [str(label).strip() for label in labels] if labels else []
        self.templates = list(templates)
        self.label_emb = None
        if self.labels:
            if len(set(self.labels)) != len(self.labels):
                raise InputError(f"labels {self.labels} repeat a label: give each once")
            texts = prompts(self.labels, self.templates)
            emb = encode_texts(model, texts).view(len(self.labels), len(self.templates), -1).mean(dim=1)
            self.label_emb = F.normalize(emb, dim=-1)  # (L, D): prompt-ensembled label embeddings

    @property
    def multivector(self) -> bool:
        """Whether images embed as several query vectors (BLIP-2)."""
        return self.model.family == "BLIP-2"

    def settings(self) -> dict[str, Any]:
        """What the table must record about the model and the columns it holds."""
        cfg, m = self.model.config, self.model
        width = cfg.vision_config.hidden_size
        tokens = 1 + (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        return {
            "model": m.name_or_path,
            "fingerprint": fingerprint(m),
            "family": m.family,
            "dim": int(cfg.image_text_hidden_size),
            "queries": int(cfg.num_query_tokens) if self.multivector else 0,
            "features": [tokens, width] if self.features else None,
            "caption": self.caption,
            "labels": self.labels,
            "templates": self.templates if self.labels else [],
        }

    @torch.no_grad()
    def __call__(self, batch: list[Decoded]) -> dict[str, Any]:
        """Columns for the decoded images of one batch."""
        m = self.model
        x = pixels(batch).to(m.device, m.dtype)
        feats = m.image_features(x)  # (N, 1 + P, W)
        emb = m.encode_images(feats).float()  # (N, D) or (N, Q, D)
        out: dict[str, Any] = {}
        if emb.dim() == 3:
            out["queries"] = emb.cpu().numpy()
            out["embedding"] = F.normalize(emb.mean(dim=1), dim=-1).cpu().numpy()
        else:
            out["embedding"] = emb.cpu().numpy()
        if self.features:
            out["features"] = feats.half().flatten(1).cpu().numpy()
        if self.caption:
            out["caption"] = m.caption(x)
        if self.label_emb is not None:
            scores = (itc_scores(emb, self.label_emb) / temperature(m)).softmax(dim=-1)  # (N, L)
            out["label"] = [self.labels[i] for i in scores.argmax(dim=-1).tolist()]
            out["label_scores"] = scores.cpu().numpy()
        return out

