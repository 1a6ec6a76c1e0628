"""The Q-Former: learned query tokens read the image through the shared text stack (`text.TextEncoder`).

The stack runs with the BLIP-2 flags: cross-attention every `cross_attention_frequency`-th layer and only at the
query positions, a query-specific feed-forward, and a text feed-forward for the checkpoints with text input (the
retrieval ones). Queries and text share self-attention. Its parameters stay float32 when the rest of the model is
half precision, as in the reference: inputs are cast up on the way in, callers cast the outputs down.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import TextConfig
from .layers import embedding, padding_mask
from .text import TextEncoder


class QFormerEmbeddings(nn.Module):
    """Word + learned absolute positions of the text input (`embeddings.*`); the LayerNorm is the Q-Former's."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.position_embeddings = embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Embeddings (B, T, H) of right-padded ids (B, T)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, H)


class QFormer(nn.Module):
    """Input LayerNorm + the text stack (`qformer.layernorm`, `qformer.encoder.layer.{i}` in checkpoints)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(0.0)
        self.encoder = TextEncoder(cfg, inner_name="attention")

    @property
    def dtype(self) -> torch.dtype:
        """The Q-Former's own dtype (float32 unless the whole model was cast)."""
        return self.layernorm.weight.dtype

    def forward(
        self,
        x: Tensor,
        query_length: int,
        attention_mask: Tensor | None = None,
        image: Tensor | None = None,
        image_kv: list[tuple[Tensor, Tensor] | None] | None = None,
    ) -> Tensor:
        """Hidden states (B, Q + T, H) in the Q-Former's dtype.

        Args:
            x: (B, Q + T, H) query tokens followed by text embeddings (T may be 0; Q is 0 for text alone).
            query_length: Q, the number of leading query positions (the only ones that see the image).
            attention_mask: (B, Q + T) 1/0 over `x` (None: all ones).
            image: (B, P, W) image features to cross-attend to.
            image_kv: per-layer cross-attention keys/values from `cross_kv` (batch 1 is shared by every row).
        """
        h = self.dropout(self.layernorm(x.to(self.dtype)))
        if image is not None:
            image = image.to(self.dtype)
        out, _ = self.encoder(
            h,
            padding_mask(attention_mask, self.dtype),
            context=image,
            encoder_kv=image_kv,
            query_length=query_length,
        )
        return out

    def cross_kv(self, image: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """Cross-attention keys/values (B, nh, P, hs) of image features (B, P, W) for every layer, computed once."""
        image = image.to(self.dtype)
        return [layer.crossattention.qkv.kv(image) if layer.has_cross else None for layer in self.encoder.layer]
