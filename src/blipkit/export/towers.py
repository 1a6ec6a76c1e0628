"""Tensor-in, tensor-out towers over a loaded model's modules: what ONNX export, torch.compile and DDP wrap.

Each tower is a thin `nn.Module` whose `forward` takes and returns tensors only; it holds the model's own modules
(no copies) and computes exactly what the model's methods compute. Decoding, tokenization and preprocessing stay
in Python (`runtime.TowerModel`), shared by the torch towers and the onnxruntime sessions.

Key/value caches travel as one stacked tensor per decoder: (R, L, 2, nh, S, hs) for R rows, L layers, keys and
values, S positions so far (S may be 0 on the first step). Rows come first, as in every decoding state, so beam
search reorders a cache with `index_select(0, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError


def _stack(kv: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Per-layer (k, v) pairs of (R, nh, S, hs) -> (R, L, 2, nh, S, hs)."""
    return torch.stack([torch.stack(pair, dim=1) for pair in kv], dim=1)


class VisionTower(nn.Module):
    """pixels (N, 3, H, W) -> patch features (N, 1 + P, W) [, L2-normalised ITC embedding (N, D) of BLIP]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.vision_proj = model.vision_proj if model.family == "BLIP" and model.has("vision_proj") else None

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        feats = self.vision_model(pixels)
        if self.vision_proj is None:
            return (feats,)
        return feats, F.normalize(self.vision_proj(feats[:, 0]), dim=-1)


class ImageProjectionTower(nn.Module):
    """BLIP image features (N, 1 + P, W) -> L2-normalised ITC embedding (N, D) of the class token: ITC from features
    computed beforehand (`encode_images(features)`, as `evaluate` does), without the vision tower."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision_proj = model.vision_proj

    def forward(self, feats: Tensor) -> Tensor:
        return F.normalize(self.vision_proj(feats[:, 0]), dim=-1)


class TextTower(nn.Module):
    """BLIP unimodal text encoder: input_ids, attention_mask (N, T) -> L2-normalised ITC embedding (N, D)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text_encoder, self.text_proj = model.text_encoder, model.text_proj

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h, _ = self.text_encoder(input_ids, attention_mask, first_only=True)  # the projection reads position 0
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)


class GroundedTextTower(nn.Module):
    """BLIP image-grounded text encoder: ids, mask (N, T), image features (N, 1 + P, W) -> hidden states (N, T, H)
    [, ITM logits (N, 2)]. VQA reads the states (the question encoding), matching the ITM logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text_encoder = model.text_encoder
        self.itm_head = model.itm_head if model.has("itm_head") else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_features: Tensor) -> tuple[Tensor, ...]:
        h, _ = self.text_encoder(input_ids, attention_mask, context=image_features)
        return (h,) if self.itm_head is None else (h, self.itm_head(h[:, 0]))


class DecoderCrossTower(nn.Module):
    """BLIP text decoder: the context (R, P, W) -> each layer's cross-attention keys and values, 2 L tensors
    (R, nh, P, hs) in the order k0, v0, k1, v1, ...

    They are separate tensors, not one stacked cache, because a graph runtime copies whatever it slices: the step
    would copy every layer's keys and values out of one stacked input on every token (42 MB a step at BLIP-base).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.bert = model.text_decoder.bert

    def forward(self, context: Tensor) -> tuple[Tensor, ...]:
        return tuple(t for pair in self.bert.cross_kv(context) for t in pair)


def cross_names(layers: int) -> list[str]:
    """Names of the per-layer cross-attention keys / values passed from `DecoderCrossTower` to `DecoderStepTower`."""
    return [f"cross_{kv}{i}" for i in range(layers) for kv in "kv"]


class DecoderStepTower(nn.Module):
    """One cached step of the BLIP text decoder.

    Inputs: input_ids (R, t) new tokens, positions (R, t), attention_mask (R, S + t) over cached and new tokens,
    context_mask (R, P), past_kv (R, L, 2, nh, S, hs), then the 2 L cross-attention keys / values (R, nh, P, hs) from
    `DecoderCrossTower`. Outputs: logits (R, t, V), present_kv (R, L, 2, nh, S + t, hs).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text_decoder = model.text_decoder

    def forward(self, input_ids, positions, attention_mask, context_mask, past_kv, *cross) -> tuple[Tensor, Tensor]:
        cache = [(past_kv[:, i, 0], past_kv[:, i, 1], cross[2 * i], cross[2 * i + 1]) for i in range(past_kv.shape[1])]
        logits, new = self.text_decoder(
            input_ids, attention_mask=attention_mask, context_mask=context_mask, cache=cache, positions=positions
        )
        return logits, _stack([(c[0], c[1]) for c in new])


class QFormerTower(nn.Module):
    """BLIP-2: image features (N, 1 + P, W) -> the language model's prefix (N, Q, E) for generation checkpoints,
    or the per-query L2-normalised ITC embeddings (N, Q, D) for retrieval ones."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.query_tokens, self.qformer = model.query_tokens, model.qformer
        self.proj = model.language_projection if model.has("language_model") else model.vision_projection
        self.normalise = not model.has("language_model")

    def forward(self, image_features: Tensor) -> Tensor:
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        q = self.qformer(queries, queries.shape[1], image=image_features)
        out = self.proj(q.to(self.proj.weight.dtype))
        return F.normalize(out, dim=-1) if self.normalise else out


class OPTStepTower(nn.Module):
    """One cached step of BLIP-2's OPT.

    Inputs: prefix_embeds (R, Q, E) (the projected queries on the first step, Q = 0 after), input_ids (R, t),
    attention_mask (R, S + Q + t), past_kv (R, L, 2, nh, S, hs). Outputs: logits of the last position (R, V),
    present_kv (R, L, 2, nh, S + Q + t, hs).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.language_model = model.language_model

    def forward(self, prefix_embeds, input_ids, attention_mask, past_kv) -> tuple[Tensor, Tensor]:
        lm = self.language_model
        embeds = torch.cat([prefix_embeds.to(lm.lm_head.weight.dtype), lm.model.decoder.embed_tokens(input_ids)], 1)
        past = [(past_kv[:, i, 0], past_kv[:, i, 1]) for i in range(past_kv.shape[1])]
        hidden, cache = lm.model.decoder(embeds, attention_mask, past)
        return lm.lm_head(hidden[:, -1]), _stack(cache)


@dataclass
class Tower:
    """A tower with what exporting it needs: example inputs, input / output names, their dynamic axes."""

    module: nn.Module
    inputs: tuple[Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]

    def __post_init__(self) -> None:
        # a new module is in training mode, and the exporter restores that mode on the model's modules it holds
        self.module.eval()


def _kv_shape(layers: int, rows: int, heads: int, length: int, head_dim: int) -> tuple[int, ...]:
    return (rows, layers, 2, heads, length, head_dim)


def blip_towers(model: nn.Module) -> dict[str, Tower]:
    """The BLIP towers this checkpoint has: vision_encoder, text_encoder, image_text_encoder, text_decoder(_cross)."""
    vc, tc = model.config.vision_config, model.config.text_config
    size = model.processor.size if model.processor is not None else (vc.image_size, vc.image_size)
    pixels = torch.zeros(2, 3, *size)
    with torch.inference_mode():
        feats = model.vision_model(pixels).clone()
    ids, mask = torch.full((2, 5), 1000 % tc.vocab_size), torch.ones(2, 5, dtype=torch.long)
    vis_out = ["image_features"] + (["image_embeds"] if model.has("vision_proj") else [])
    out = {"vision_encoder": Tower(VisionTower(model), (pixels,), ["pixels"], vis_out,
                                   {"pixels": {0: "n"}, **{o: {0: "n"} for o in vis_out}})}
    if model.has("vision_proj"):
        out["vision_projection"] = Tower(ImageProjectionTower(model), (feats,), ["image_features"], ["image_embeds"],
                                         {"image_features": {0: "n", 1: "p"}, "image_embeds": {0: "n"}})
    text_axes = {"input_ids": {0: "n", 1: "t"}, "attention_mask": {0: "n", 1: "t"}}
    if model.has("text_proj"):
        out["text_encoder"] = Tower(TextTower(model), (ids, mask), ["input_ids", "attention_mask"], ["text_embeds"],
                                    {**text_axes, "text_embeds": {0: "n"}})
    if model.has("text_encoder") and (model.has("itm_head") or not model.has("vision_proj")):
        names = ["hidden_states"] + (["itm_logits"] if model.has("itm_head") else [])
        out["image_text_encoder"] = Tower(
            GroundedTextTower(model), (ids, mask, feats), ["input_ids", "attention_mask", "image_features"], names,
            {**text_axes, "image_features": {0: "n"}, "hidden_states": {0: "n", 1: "t"}, "itm_logits": {0: "n"}})
    if model.has("text_decoder"):
        context = feats if model.has("vision_proj") or not model.has("text_encoder") else \
            torch.zeros(2, 5, tc.hidden_size)  # the VQA answer decoder reads the question states
        L, nh, hs = tc.num_hidden_layers, tc.num_attention_heads, tc.hidden_size // tc.num_attention_heads
        cross, names = [torch.zeros(2, nh, context.shape[1], hs) for _ in range(2 * L)], cross_names(L)
        cross_axes = {n: {0: "r", 2: "p"} for n in names}
        out["text_decoder_cross"] = Tower(DecoderCrossTower(model), (context,), ["context"], names,
                                          {"context": {0: "r", 1: "p"}, **cross_axes})
        step_ids = torch.full((2, 1), tc.bos_token_id)
        out["text_decoder"] = Tower(
            DecoderStepTower(model),
            (step_ids, torch.full((2, 1), 3), torch.ones(2, 4, dtype=torch.long), torch.ones(2, context.shape[1],
             dtype=torch.long), torch.zeros(_kv_shape(L, 2, nh, 3, hs)), *cross),
            ["input_ids", "positions", "attention_mask", "context_mask", "past_kv", *names], ["logits", "present_kv"],
            {"input_ids": {0: "r", 1: "t"}, "positions": {0: "r", 1: "t"}, "attention_mask": {0: "r", 1: "s_t"},
             "context_mask": {0: "r", 1: "p"}, "past_kv": {0: "r", 4: "s"}, **cross_axes,
             "logits": {0: "r", 1: "t"}, "present_kv": {0: "r", 4: "s_t"}})
    return out


def blip2_towers(model: nn.Module, with_lm: bool = True) -> dict[str, Tower]:
    """The BLIP-2 towers: vision_encoder, qformer and, for OPT checkpoints, language_model (a cached step)."""
    vc = model.config.vision_config
    size = model.processor.size if model.processor is not None else (vc.image_size, vc.image_size)
    pixels = torch.zeros(2, 3, *size)
    with torch.inference_mode():
        feats = model.vision_model(pixels).clone()
    q_out = "prefix_embeds" if model.has("language_model") else "image_embeds"
    out = {
        "vision_encoder": Tower(VisionTower(model), (pixels,), ["pixels"], ["image_features"],
                                {"pixels": {0: "n"}, "image_features": {0: "n"}}),
        "qformer": Tower(QFormerTower(model), (feats,), ["image_features"], [q_out],
                         {"image_features": {0: "n"}, q_out: {0: "n"}}),
    }
    if model.has("language_model") and with_lm:
        if model.config.lm_type != "opt":
            raise InputError(f"{model.name_or_path}: ONNX export of the {model.config.lm_type} language model is not "
                             "supported (OPT checkpoints are); export the vision_encoder and qformer parts only")
        tc = model.config.text_config
        L, nh = tc.num_hidden_layers, tc.num_attention_heads
        hs, Q = tc.hidden_size // nh, model.config.num_query_tokens
        prefix = torch.zeros(2, Q, tc.word_embed_proj_dim)
        out["language_model"] = Tower(
            OPTStepTower(model),
            (prefix, torch.full((2, 2), 5), torch.ones(2, 3 + Q + 2, dtype=torch.long),
             torch.zeros(_kv_shape(L, 2, nh, 3, hs))),
            ["prefix_embeds", "input_ids", "attention_mask", "past_kv"], ["logits", "present_kv"],
            {"prefix_embeds": {0: "r", 1: "q"}, "input_ids": {0: "r", 1: "t"}, "attention_mask": {0: "r", 1: "s_t"},
             "past_kv": {0: "r", 4: "s"}, "logits": {0: "r"}, "present_kv": {0: "r", 4: "s_t"}})
    return out


def towers(model: nn.Module, parts: list[str] | tuple[str, ...] | None = None) -> dict[str, Tower]:
    """The model's towers by name (all it has, or `parts`); an unknown part is an InputError naming the known ones.

    When only some parts are asked for, unsupported language models are not an error unless asked for.
    """
    if model.family == "BLIP":
        found = blip_towers(model)
    else:
        found = blip2_towers(model, with_lm=parts is None or "language_model" in parts)
        if parts is not None and "language_model" in parts and not model.has("language_model"):
            found.pop("language_model", None)
    if parts is None:
        return found
    unknown = [p for p in parts if p not in found]
    if unknown:
        raise InputError(f"{model.name_or_path} has no part '{unknown[0]}' to export; its parts: {', '.join(found)}")
    return {p: found[p] for p in parts}
