"""The BERT-style text stack with cross-attention, written once for BLIP's MED and BLIP-2's Q-Former.

One layer = self-attention, optional cross-attention (every `cross_attention_frequency`-th layer, at query
positions only when queries are present), and a feed-forward (separate ones for query and text positions in the
Q-Former). The same stack is a bidirectional encoder, an image-grounded encoder, or a causal decoder with a KV cache.

The cache of one layer is a tuple `(self_k, self_v, cross_k, cross_v)` of (B, nh, T, hs) tensors, batch first, so
beam search reorders it with `index_select(0, ...)`. Cross-attention keys/values are computed once per image and
may be passed in precomputed (`encoder_kv`) with batch 1 to be shared by every row: one image against many texts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import TextConfig
from .layers import activation, attend, causal_mask, embedding, merge_heads, padding_mask, split_heads

LayerCache = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


class QKV(nn.Module):
    """query / key / value projections (keys and values may come from another width: the image)."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        #: dtype the keys/values are kept in (None: the model's); an int8 decoder keeps its cross-attention cache in
        #: bfloat16, half the bytes each decoding step reads over the image tokens (see `blipkit.quantize`)
        self.kv_dtype: torch.dtype | None = None

    def kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, nh, T, hs) of `x`, in `kv_dtype` if set."""
        k, v = split_heads(self.key(x), self.heads), split_heads(self.value(x), self.heads)
        return (k, v) if self.kv_dtype is None else (k.to(self.kv_dtype), v.to(self.kv_dtype))


class AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual) (`output` / `attention.output` in checkpoints)."""

    def __init__(self, cfg: TextConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """Attention block; the inner projections are named `self` in BLIP and `attention` in the Q-Former."""

    def __init__(self, cfg: TextConfig, kv_width: int, inner_name: str):
        super().__init__()
        self.inner_name = inner_name
        self.add_module(inner_name, QKV(cfg, kv_width))
        self.output = AddNorm(cfg, cfg.hidden_size)

    @property
    def qkv(self) -> QKV:
        """The query/key/value projections, whatever the checkpoint calls them."""
        return getattr(self, self.inner_name)

    def forward(self, x: Tensor, mask: Tensor | None, k: Tensor, v: Tensor) -> Tensor:
        q = split_heads(self.qkv.query(x), self.qkv.heads)  # (B, nh, T, hs)
        return self.output(merge_heads(attend(q, k, v, mask, block=self.qkv)), x)  # `block`: see layers.recording


class FeedForward(nn.Module):
    """intermediate (dense + activation) then output (dense + add & norm)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class TextLayer(nn.Module):
    """Self-attention, optional cross-attention, feed-forward(s); names as in the checkpoints."""

    def __init__(self, cfg: TextConfig, index: int, inner_name: str):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size, inner_name)
        self.has_cross = index % cfg.cross_attention_frequency == 0
        if self.has_cross:
            self.crossattention = Attention(cfg, cfg.encoder_hidden_size, inner_name)
        if cfg.text_ffn:
            self.intermediate = FeedForward(cfg)
            self.output = AddNorm(cfg, cfg.intermediate_size)
        if cfg.query_ffn:
            self.intermediate_query = FeedForward(cfg)
            self.output_query = AddNorm(cfg, cfg.intermediate_size)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        encoder_kv: tuple[Tensor, Tensor] | None = None,
        query_length: int = 0,
        first_only: bool = False,
    ) -> tuple[Tensor, LayerCache]:
        """One layer; returns the output and this layer's cache (self and cross keys/values so far). With
        `first_only`, only the first position's output is computed (B, 1, H), its attention over every position: what
        a head reading that position alone needs (`self_mask` must be a padding mask, the same for every query)."""
        k, v = self.attention.qkv.kv(x)  # (B, nh, T, hs)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        h = self.attention(x[:, :1] if first_only else x, self_mask, k, v)
        ck = cv = None
        use_cross = self.has_cross and (
            context is not None or encoder_kv is not None or (cache and cache[2] is not None)
        )
        if use_cross:
            if encoder_kv is not None:
                ck, cv = encoder_kv
            elif cache is not None and cache[2] is not None:
                ck, cv = cache[2], cache[3]
            else:
                ck, cv = self.crossattention.qkv.kv(context)
            if query_length:  # Q-Former: only the query positions look at the image
                hq = self.crossattention(h[:, :query_length], context_mask, ck, cv)
                h = torch.cat([hq, h[:, query_length:]], dim=1)
            else:
                h = self.crossattention(h, context_mask, ck, cv)
        if query_length:
            out = self.output_query(self.intermediate_query(h[:, :query_length]), h[:, :query_length])
            if h.shape[1] > query_length:
                rest = h[:, query_length:]
                out = torch.cat([out, self.output(self.intermediate(rest), rest)], dim=1)
        else:
            out = self.output(self.intermediate(h), h)
        return out, (k, v, ck, cv)


class TextEncoder(nn.Module):
    """The layer stack (`encoder.layer.{i}` in checkpoints)."""

    def __init__(self, cfg: TextConfig, inner_name: str = "self"):
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(cfg, i, inner_name) for i in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: list[LayerCache] | None = None,
        encoder_kv: list[tuple[Tensor, Tensor] | None] | None = None,
        query_length: int = 0,
        first_only: bool = False,
    ) -> tuple[Tensor, list[LayerCache]]:
        """Run every layer; `self_mask` / `context_mask` are additive masks (see `layers.padding_mask`).
        `first_only`: the last layer computes the first position alone (output (B, 1, H); see `TextLayer`)."""
        new_cache = []
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            args = (
                x,
                self_mask,
                context,
                context_mask,
                cache[i] if cache else None,
                encoder_kv[i] if encoder_kv else None,
                query_length,
                first_only and i == last,
            )
            if self.gradient_checkpointing and self.training:
                x, c = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x, c = layer(*args)
            new_cache.append(c)
        return x, new_cache


class TextEmbeddings(nn.Module):
    """Word + learned absolute position embeddings, then LayerNorm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id)
        self.position_embeddings = embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(0.0)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class TextModel(nn.Module):
    """Embeddings + stack: BLIP's text encoder (bidirectional) and decoder (causal, cached)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextEncoder(cfg)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        causal: bool = False,
        cache: list[LayerCache] | None = None,
        encoder_kv: list[tuple[Tensor, Tensor] | None] | None = None,
        positions: Tensor | None = None,
        first_only: bool = False,
    ) -> tuple[Tensor, list[LayerCache]]:
        """Hidden states (B, T, H) and the cache.

        Args:
            input_ids: (B, T) new tokens (only those after the cache when decoding).
            attention_mask: (B, T_total) 1/0 over cached + new tokens (None: all ones).
            context: (B, P, W) image features (or question features) to cross-attend to.
            context_mask: (B, P) 1/0 over `context` (None: all ones).
            causal: decoder mode (each token sees itself and what came before).
            cache: per-layer caches from the previous call.
            encoder_kv: per-layer precomputed cross-attention keys/values (see `cross_kv`).
            positions: (B, T) position ids (default: continue after the cache).
            first_only: the last layer computes only the first position (hidden states (B, 1, H)): enough for
                the ITC and ITM heads, which read that position alone. Not with `causal`.
        """
        B, T = input_ids.shape
        past = cache[0][0].shape[2] if cache else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embeddings(input_ids, positions)
        dtype = x.dtype
        self_mask = causal_mask(attention_mask, past, dtype) if causal else padding_mask(attention_mask, dtype)
        return self.encoder(x, self_mask, context, padding_mask(context_mask, dtype), cache, encoder_kv,
                            first_only=first_only and not causal)

    def cross_kv(self, context: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """Cross-attention keys/values of `context` for every layer, computed once and reusable across texts."""
        return [layer.crossattention.qkv.kv(context) if layer.has_cross else None for layer in self.encoder.layer]


class LMHead(nn.Module):
    """`cls.predictions`: transform (dense, act, LayerNorm) then the vocabulary projection."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.transform_act_fn = activation(cfg.hidden_act)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # One bias under two names, as in the checkpoints; `bias` is registered first so it is the name saved.
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.bias = self.bias

    def forward(self, x: Tensor) -> Tensor:
        t = self.transform
        return self.decoder(t.LayerNorm(t.transform_act_fn(t.dense(x))))


class TextLMHeadModel(nn.Module):
    """BLIP's text decoder: `bert` (the stack) + `cls` (the LM head), weights tied to the word embeddings."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.bert = TextModel(cfg)
        self.cls = nn.Module()
        self.cls.predictions = LMHead(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: Tensor, **kw) -> tuple[Tensor, list[LayerCache]]:
        """Logits (B, T, V) and the cache; keyword arguments as `TextModel.forward` (causal by default)."""
        kw.setdefault("causal", True)
        h, cache = self.bert(input_ids, **kw)
        return self.cls.predictions(h), cache
