"""OPT, the decoder-only language model of BLIP-2 OPT checkpoints; names equal transformers' `OPTForCausalLM`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from ..fields import (
    BOOL,
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
    check_heads,
    check_token_ids,
)
from ..layers import embedding

KV = tuple[Tensor, Tensor]  # cached keys and values of one layer, each (B, nh, S, hs)
Step = Callable[[Tensor, Any], tuple[Tensor, Any]]
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class OPTConfig:
    """Architecture of an OPT model; field names follow transformers' `config.json`."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False  # `_remove_final_layer_norm`: checkpoints fine-tuned before transformers 4.20
    word_embed_proj_dim: int | None = None  # None: same as hidden_size (no project_in / project_out)
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int | list[int] = 2
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.activation_function not in ACTIVATIONS:
            raise CheckpointError(
                f"OPT activation_function {self.activation_function!r} is not supported; use one of {list(ACTIVATIONS)}"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json", prefix: str = "") -> OPTConfig:
        """Build from a transformers `config.json` dict, every value checked (keys this model does not use are ignored).

        `source` and `prefix` (e.g. "text_config.") say where the dict comes from, for errors naming file and key.
        """
        check(cfg, OPT_RULES, source, prefix)
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        kwargs["remove_final_layer_norm"] = cfg.get("_remove_final_layer_norm", False)
        out = cls(**kwargs)
        ids = ("pad_token_id", "bos_token_id", "eos_token_id")
        check_token_ids(cfg, out, source, prefix, ids, required=ids)
        check_heads(out.hidden_size, out.num_attention_heads, source, prefix)
        return out


OPT_RULES: dict[str, Rule] = {
    "vocab_size": Int(1, MAX_VOCAB),
    "hidden_size": Int(1, MAX_HIDDEN),
    "num_hidden_layers": Int(1, MAX_LAYERS),
    "ffn_dim": Int(1, MAX_FFN),
    "num_attention_heads": Int(1, MAX_HEADS),
    "max_position_embeddings": Int(1, MAX_POSITIONS),
    "do_layer_norm_before": BOOL,
    "_remove_final_layer_norm": BOOL,
    "word_embed_proj_dim": Int(1, MAX_HIDDEN, nullable=True),
    "enable_bias": BOOL,
    "layer_norm_elementwise_affine": BOOL,
    "activation_function": Rule(str, choices=tuple(ACTIVATIONS)),
    "dropout": PROB,
    "attention_dropout": PROB,
    "tie_word_embeddings": BOOL,
}


class OPTLearnedPositionalEmbedding(nn.Embedding):
    """Learned positions; OPT reserves the first two rows (fairseq's padding offset), so position p reads row p + 2."""

    offset = 2

    def __init__(self, num_positions: int, dim: int) -> None:
        super().__init__(num_positions + self.offset, dim)

    def forward(self, position_ids: Tensor) -> Tensor:
        """Embed position ids (B, T); padded slots carry -1 and read row 1, as in the reference."""
        return super().forward(position_ids + self.offset)


class OPTAttention(nn.Module):
    """Causal multi-head self-attention with a key/value cache."""

    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = cfg.attention_dropout
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.enable_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.enable_bias)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.enable_bias)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.enable_bias)

    def forward(self, x: Tensor, mask: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        """Attend x (B, T, C) to the cache plus itself under the boolean mask (B, 1, T, S); return output and cache."""
        B, T, C = x.shape
        # the query is scaled before the product (not inside SDPA) so the rounding matches the reference
        q = (self.q_proj(x) * self.scaling).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nh, S, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class OPTDecoderLayer(nn.Module):
    """Self-attention then MLP, each residual; layer norm before (most sizes) or after (350m) each."""

    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.do_layer_norm_before
        self.dropout = nn.Dropout(cfg.dropout)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)

    def forward(self, x: Tensor, mask: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        """Transform x (B, T, C); return it and this layer's updated cache."""
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        h, kv = self.self_attn(h, mask, past)
        x = x + self.dropout(h)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.dropout(self.fc2(self.act(self.fc1(h))))
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x, kv


class OPTDecoder(nn.Module):
    """Token and position embeddings, the layer stack and the optional projections around it."""

    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        proj = cfg.word_embed_proj_dim != cfg.hidden_size
        self.embed_tokens = embedding(cfg.vocab_size, cfg.word_embed_proj_dim, cfg.pad_token_id)
        self.embed_positions = OPTLearnedPositionalEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False) if proj else None
        self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False) if proj else None
        final_norm = cfg.do_layer_norm_before and not cfg.remove_final_layer_norm
        affine = cfg.layer_norm_elementwise_affine
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine) if final_norm else None
        self.layers = nn.ModuleList([OPTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(
        self, inputs_embeds: Tensor, attention_mask: Tensor, past: list[KV] | None = None
    ) -> tuple[Tensor, list[KV]]:
        """Run embeds (B, T, E) after `past`; attention_mask (B, S) covers cache and new tokens, 0 at padding."""
        B, T, _ = inputs_embeds.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        mask = attention_mask.long()
        if mask.shape != (B, past_len + T):
            raise InputError(f"attention_mask has shape {tuple(mask.shape)}, expected {(B, past_len + T)}")
        # positions count only real tokens, so a left-padded row gets the same positions as the unpadded one
        positions = (torch.cumsum(mask, dim=1) * mask - 1)[:, past_len:]  # (B, T)
        q_pos = torch.arange(past_len, past_len + T, device=mask.device)
        causal = torch.arange(past_len + T, device=mask.device)[None, :] <= q_pos[:, None]  # (T, S)
        allowed = causal[None, None] & mask[:, None, None, :].bool()  # (B, 1, T, S)

        x = self.project_in(inputs_embeds) if self.project_in is not None else inputs_embeds
        x = x + self.embed_positions(positions).to(x.dtype)  # (B, T, C)
        cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, allowed, None if past is None else past[i])
            cache.append(kv)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x, cache  # (B, T, E)


class OPTModel(nn.Module):
    """Holds the decoder under the name `model.decoder`, as in transformers."""

    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTForCausalLM(nn.Module):
    """OPT with its language-modelling head; `state_dict()` keys equal transformers' `OPTForCausalLM`."""

    # tied key -> the key it shares storage with; a checkpoint may omit the tied key when the model ties it
    tied_weights_keys: dict[str, str] = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, cfg: OPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = OPTModel(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (word_embed_proj_dim wide), for building `inputs_embeds`."""
        return self.model.decoder.embed_tokens

    def untie_lm_head(self) -> None:
        """Give lm_head its own copy of the weight, for checkpoints that store a head differing from the embedding."""
        self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone())

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return (logits (B, T, V), loss or None); labels (B, T) are shifted inside, -100 is ignored.

        Exactly one of input_ids (B, T) and inputs_embeds (B, T, E) is given; attention_mask (B, T) is 0 at padding.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.decoder.embed_tokens(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        hidden, _ = self.model.decoder(inputs_embeds, attention_mask)
        logits = self.lm_head(hidden)  # (B, T, V)
        loss = None
        if labels is not None:
            # token t predicts label t + 1; the loss is computed in float32 as the reference does
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        return logits, loss

    def make_step(
        self,
        prompt_mask: Tensor,
        prefix_embeds: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        rows: int = 1,
    ) -> Step:
        """Build `step(new_ids, state) -> (last logits (R, V), state)` for cached decoding.

        The first call takes the left-padded prompt ids (R, T) whose mask is prompt_mask; prefix_embeds (B, P, E)
        (BLIP-2's projected queries) go before them. Later calls take the new tokens (R, t). The context tensors
        have B rows and are repeated `rows` times each (repeat_interleave), so R = B * rows.
        """

        def expand(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(rows, dim=0)

        prompt_mask_r, prefix_r, prefix_mask_r = expand(prompt_mask), expand(prefix_embeds), expand(prefix_mask)
        embed = self.model.decoder.embed_tokens

        def step(new_ids: Tensor, state: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any]]:
            embeds = embed(new_ids)  # (R, t, E)
            if state is None:
                if new_ids.shape != prompt_mask_r.shape:
                    raise InputError(
                        f"first step got ids of shape {tuple(new_ids.shape)} but the prompt mask repeated "
                        f"{rows} times has shape {tuple(prompt_mask_r.shape)}"
                    )
                mask, past = prompt_mask_r.long(), None
                if prefix_r is not None:
                    pm = prefix_mask_r if prefix_mask_r is not None else mask.new_ones(prefix_r.shape[:2])
                    embeds = torch.cat([prefix_r.to(embeds.dtype), embeds], dim=1)  # (R, P + T, E)
                    mask = torch.cat([pm.to(mask), mask], dim=1)  # (R, P + T)
            else:
                past = state["kv"]
                mask = torch.cat([state["mask"], state["mask"].new_ones(new_ids.shape)], dim=1)  # (R, S)
            hidden, cache = self.model.decoder(embeds, mask, past)
            # left padding puts every row's newest real token last, so only that position is needed
            return self.lm_head(hidden[:, -1]), {"mask": mask, "kv": cache}  # (R, V)

        return step
