"""T5 / Flan-T5, the encoder-decoder language model of BLIP-2 Flan-T5 checkpoints; names equal transformers'."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from ..fields import (
    BOOL,
    EPS,
    MAX_FFN,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    PROB,
    Int,
    Rule,
    check,
    check_token_ids,
    require,
)
from ..layers import embedding

KV = tuple[Tensor, Tensor]  # keys and values of one attention layer, each (B, nh, S, hs)
Step = Callable[[Tensor, Any], tuple[Tensor, Any]]


def gelu_new(x: Tensor) -> Tensor:
    """The tanh approximation of GELU, written out as in the reference so results agree to the last bit."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": gelu_new, "silu": F.silu}


@dataclass
class T5Config:
    """Architecture of a T5 model; field names follow transformers' `config.json`."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5) or "gated-gelu" (T5 v1.1, Flan-T5)
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    decoder_start_token_id: int = 0
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # None: follows tie_word_embeddings (original T5 rescales, v1.1 not)

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        gate, _, act = self.feed_forward_proj.rpartition("-")
        if gate not in ("", "gated") or act not in ACTIVATIONS:
            raise CheckpointError(f"T5 feed_forward_proj {self.feed_forward_proj!r} is not supported")
        # "gated-gelu" means the tanh approximation, for historical reasons
        self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json", prefix: str = "") -> T5Config:
        """Build from a transformers `config.json` dict, every value checked (keys this model does not use are ignored).

        `source` and `prefix` (e.g. "text_config.") say where the dict comes from, for errors naming file and key.
        """
        check(cfg, T5_RULES, source, prefix)
        proj = cfg.get("feed_forward_proj", "relu")
        gate, _, act = proj.rpartition("-")
        require(gate in ("", "gated") and act in ACTIVATIONS, source, prefix + "feed_forward_proj",
                f"is {proj!r}, not ACT or gated-ACT with ACT one of {', '.join(ACTIVATIONS)}")
        names = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in cfg.items() if k in names})
        used = ("pad_token_id", "eos_token_id", "decoder_start_token_id")
        check_token_ids(cfg, out, source, prefix, (*used, "bos_token_id"), required=used)
        buckets, distance = out.relative_attention_num_buckets, out.relative_attention_max_distance
        require(buckets >= 4, source, prefix + "relative_attention_num_buckets", f"is {buckets}, fewer than 4")
        require(distance > buckets // 2, source, prefix + "relative_attention_max_distance",
                f"is {distance}, not above half the {buckets} buckets")
        return out


T5_RULES: dict[str, Rule] = {
    "vocab_size": Int(1, MAX_VOCAB),
    "d_model": Int(1, MAX_HIDDEN),
    "d_kv": Int(1, MAX_HIDDEN),
    "d_ff": Int(1, MAX_FFN),
    "num_layers": Int(1, MAX_LAYERS),
    "num_decoder_layers": Int(1, MAX_LAYERS, nullable=True),
    "num_heads": Int(1, MAX_HEADS),
    "relative_attention_num_buckets": Int(1, MAX_POSITIONS),
    "relative_attention_max_distance": Int(1, MAX_POSITIONS),
    "dropout_rate": PROB,
    "layer_norm_epsilon": EPS,
    "feed_forward_proj": Rule(str),
    "tie_word_embeddings": BOOL,
    "scale_decoder_outputs": Rule(bool, nullable=True),
}


def _clamp_fp16(x: Tensor) -> Tensor:
    """Pull fp16 activations back inside the representable range (T5's residual stream grows past it)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


def relative_position_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """Map key - query offsets to buckets: exact for small offsets, logarithmic up to max_distance."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)  # the decoder never looks ahead: only past offsets matter
    max_exact = num_buckets // 2
    log_ratio = torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
    large = torch.clamp(max_exact + (log_ratio * (num_buckets - max_exact)).long(), max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class T5LayerNorm(nn.Module):
    """RMS norm without bias or mean subtraction; the variance is taken in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise x (..., C)."""
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5DenseActDense(nn.Module):
    """Plain MLP (original T5), or gated with wi_0 / wi_1 (T5 v1.1, Flan-T5)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.gated = cfg.feed_forward_proj.startswith("gated-")
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.act = ACTIVATIONS[cfg.dense_act_fn]

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to x (..., C)."""
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (..., d_ff)
        # wo may be kept in float32 when the rest is half precision (Flan-T5-XXL overflows otherwise); an int8
        # (quantized) wo takes the activations as they are
        w = self.wo.weight
        return self.wo(self.dropout(h).to(w.dtype) if w.is_floating_point() else self.dropout(h))


class T5Attention(nn.Module):
    """Unscaled multi-head attention; the first self-attention of each stack owns the relative position bias."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool = False, bidirectional: bool = True) -> None:
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = cfg.num_heads, cfg.d_kv, cfg.dropout_rate
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = embedding(self.num_buckets, cfg.num_heads)

    def compute_bias(self, q_len: int, k_len: int, past_len: int = 0) -> Tensor:
        """Relative position bias (1, nh, q_len, k_len) for queries starting at position past_len."""
        device = self.relative_attention_bias.weight.device
        q_pos = torch.arange(q_len, device=device)[:, None] + past_len
        rel = torch.arange(k_len, device=device)[None, :] - q_pos  # (q, k)
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, nh, q, k)

    def project_kv(self, x: Tensor) -> KV:
        """Keys and values (B, nh, S, hs) of x (B, S, C)."""
        B, S, _ = x.shape
        k = self.k(x).view(B, S, self.n_heads, self.d_kv).transpose(1, 2)  # (B, nh, S, hs)
        v = self.v(x).view(B, S, self.n_heads, self.d_kv).transpose(1, 2)  # (B, nh, S, hs)
        return k, v

    def forward(self, x: Tensor, mask: Tensor, kv: KV | None = None, past: KV | None = None) -> tuple[Tensor, KV]:
        """Attend x (B, T, C) to kv, or to past + x (self-attention); the float mask (B, nh, T, S) holds the bias."""
        B, T, _ = x.shape
        if kv is None:
            kv = self.project_kv(x)
            if past is not None:
                kv = torch.cat([past[0], kv[0]], dim=2), torch.cat([past[1], kv[1]], dim=2)  # (B, nh, S, hs)
        q = self.q(x).view(B, T, self.n_heads, self.d_kv).transpose(1, 2)  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        # scale=1.0: T5 folds the 1/sqrt(d) factor into its initialisation, the scores are never rescaled
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, dropout_p=p, scale=1.0)  # (B, nh, T, hs)
        return self.o(y.transpose(1, 2).reshape(B, T, -1)), kv


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention, with a cache of its own keys and values."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, bidirectional: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias, bidirectional)
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, mask: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        """Return x plus attention over (cache, x), and the extended cache."""
        h, kv = self.SelfAttention(self.layer_norm(x), mask, past=past)
        return x + self.dropout(h), kv


class T5LayerCrossAttention(nn.Module):
    """Pre-norm residual attention to the encoder output (keys and values projected once, by the caller)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, mask: Tensor, kv: KV) -> Tensor:
        """Return x plus attention to the encoder keys and values kv."""
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), mask, kv)[0])


class T5LayerFF(nn.Module):
    """Pre-norm residual MLP."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        """Return x plus the MLP of its norm."""
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """`layer` = [self-attention, (cross-attention in the decoder), MLP]."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, is_decoder: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias, not is_decoder)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(cfg))
        self.layer.append(T5LayerFF(cfg))

    def forward(
        self, x: Tensor, mask: Tensor, past: KV | None, cross_mask: Tensor | None, cross: KV | None
    ) -> tuple[Tensor, KV]:
        """Run the sub-layers on x (B, T, C); return it and the self-attention cache."""
        x, kv = self.layer[0](x, mask, past)
        x = _clamp_fp16(x)
        if cross is not None:
            x = _clamp_fp16(self.layer[1](x, cross_mask, cross))
        return _clamp_fp16(self.layer[-1](x)), kv


class T5Stack(nn.Module):
    """Encoder or decoder: shared embedding, blocks, final norm."""

    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding, num_layers: int, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens  # the model's `shared` embedding, listed again under this name
        self.block = nn.ModuleList([T5Block(cfg, i == 0, is_decoder) for i in range(num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        past: list[KV] | None = None,
        cross: list[KV] | None = None,
        cross_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """Run embeds (B, T, C) after `past`; masks are (B, S) / (B, S_enc), 0 at padding; cross = encoder K/V."""
        B, T, _ = inputs_embeds.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        S = past_len + T
        bias = self.block[0].layer[0].SelfAttention.compute_bias(T, S, past_len)  # (1, nh, T, S)
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.bool, device=bias.device)
        allowed = attention_mask[:, None, None, :].bool()  # (B, 1, 1, S)
        if self.is_decoder:
            q_pos = torch.arange(past_len, S, device=bias.device)[:, None]
            allowed = allowed & (torch.arange(S, device=bias.device)[None, :] <= q_pos)  # (B, 1, T, S)
        # the bias and the mask fold into one float mask; a masked slot gets the dtype's min (not -inf) so a row
        # with nothing to attend to stays finite, as in the reference; the first layer's bias serves every layer
        neg = torch.finfo(bias.dtype).min
        mask = torch.where(allowed, bias, neg)  # (B, nh, T, S)
        cross_add = None
        if cross is not None:  # cross-attention has no position bias: the float mask is 0 or min
            cross_add = torch.zeros_like(cross_mask, dtype=bias.dtype).masked_fill(~cross_mask.bool(), neg)
            cross_add = cross_add[:, None, None, :]  # (B, 1, 1, S_enc)

        x = self.dropout(inputs_embeds)
        cache = []
        for i, blk in enumerate(self.block):
            x, kv = blk(x, mask, None if past is None else past[i], cross_add, None if cross is None else cross[i])
            cache.append(kv)
        return self.dropout(self.final_layer_norm(x)), cache  # (B, T, C)


class T5ForConditionalGeneration(nn.Module):
    """T5 with its language-modelling head; `state_dict()` keys equal transformers' `T5ForConditionalGeneration`."""

    # tied key -> the key it shares storage with; a checkpoint may omit the tied keys when the model ties them
    tied_weights_keys: dict[str, str] = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
        "lm_head.weight": "shared.weight",
    }
    # present in some old checkpoints but never used (cross-attention has no position bias)
    unused_checkpoint_keys = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.config = cfg
        self.shared = embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared, cfg.num_layers, is_decoder=False)
        self.decoder = T5Stack(cfg, self.shared, cfg.num_decoder_layers, is_decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def get_input_embeddings(self) -> nn.Embedding:
        """The shared token embedding, for building `inputs_embeds`."""
        return self.shared

    def untie_lm_head(self) -> None:
        """Give lm_head its own copy of the weight, for checkpoints that store a head differing from `shared`."""
        self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone())

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs for targets (B, T): start token, then labels[:, :-1] with -100 replaced by pad."""
        start = labels.new_full((labels.shape[0], 1), self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, C) for embeds (B, S, C); attention_mask (B, S) is 0 at padding."""
        return self.encoder(inputs_embeds, attention_mask)[0]

    def _logits(self, hidden: Tensor) -> Tensor:
        """LM head, after the d_model**-0.5 rescale original T5 applies when its head is the embedding."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model**-0.5
        return self.lm_head(hidden)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return (logits (B, T, V), loss or None); labels (B, T) are decoder targets, -100 is ignored.

        Exactly one of input_ids and inputs_embeds feeds the encoder; decoder_input_ids default to shift_right(labels).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        if decoder_input_ids is None and labels is None:
            raise InputError("pass decoder_input_ids or labels (the decoder inputs are derived from labels)")
        decoder_input_ids = self.shift_right(labels) if decoder_input_ids is None else decoder_input_ids
        if inputs_embeds is None:
            inputs_embeds = self.shared(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        enc = self.encode(inputs_embeds, attention_mask)
        cross = [blk.layer[1].EncDecAttention.project_kv(enc) for blk in self.decoder.block]
        dec, _ = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, None, cross, attention_mask)
        logits = self._logits(dec)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    def make_step(self, encoder_hidden: Tensor, encoder_mask: Tensor | None = None, rows: int = 1) -> Step:
        """Build `step(new_ids, state) -> (last logits (R, V), state)` for cached decoding.

        The first call takes the decoder prompt (R, t): either (R, 1) filled with decoder_start_token_id, as the
        reference starts, or (R, 0) to have the start token inserted. Later calls take the new tokens. encoder_hidden
        (B, S, C) and encoder_mask (B, S) are repeated `rows` times each (repeat_interleave), so R = B * rows; the
        cross-attention keys and values are computed on the first call and carried in the state.
        """
        hidden = encoder_hidden.repeat_interleave(rows, dim=0)
        if encoder_mask is None:
            encoder_mask = torch.ones(encoder_hidden.shape[:2], dtype=torch.long, device=encoder_hidden.device)
        enc_mask = encoder_mask.repeat_interleave(rows, dim=0)

        def step(new_ids: Tensor, state: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any]]:
            if state is None:
                if new_ids.shape[0] != hidden.shape[0]:
                    raise InputError(f"first step got {new_ids.shape[0]} rows, the context has {hidden.shape[0]}")
                if new_ids.shape[1] == 0:
                    new_ids = new_ids.new_full((new_ids.shape[0], 1), self.config.decoder_start_token_id)
                cross = [blk.layer[1].EncDecAttention.project_kv(hidden) for blk in self.decoder.block]
                state = {"kv": None, "cross": cross, "encoder_mask": enc_mask}
            dec, cache = self.decoder(self.shared(new_ids), None, state["kv"], state["cross"], state["encoder_mask"])
            return self._logits(dec[:, -1]), {**state, "kv": cache}  # (R, V)

        return step
