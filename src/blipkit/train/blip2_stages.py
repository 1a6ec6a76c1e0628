"""The two BLIP-2 training stages on the shared loop: the model each starts from, and its `Recipe`.

Stage 1 (`--stage qformer1`) builds a retrieval BLIP-2 (`Blip2ForImageTextRetrieval` layout) whose image encoder is
a trained BLIP's ViT, kept frozen, with a fresh Q-Former (cross-attention every second layer) that reads BLIP's
WordPiece tokens; it trains ITC, ITM and ITG and saves the Hub checkpoint plus the ITG head beside it.
Stage 2 (`--stage qformer2`) builds a generation BLIP-2 (`Blip2ForConditionalGeneration`) from a stage-1 checkpoint
and a language model directory (OPT or Flan-T5, frozen) and trains the queries, the Q-Former and the projection on
captioning; the saved directory carries the language model's tokenizer, which is what `caption()` decodes with.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..blip import Blip
from ..blip2 import Blip2
from ..blip2_config import ARCHITECTURES, GENERATION, RETRIEVAL, T5_CONTEXT, Blip2Config
from ..config import TextConfig
from ..errors import CheckpointError, InputError
from ..lm import OPTForCausalLM, T5ForConditionalGeneration
from ..processing import Tokenizer
from ..vision import VisionModel
from .blip2_losses import (
    STAGE1_OBJECTIVES,
    CaptionCollate,
    GenerativeObjectives,
    QFormerObjectives,
    check_language_model,
    init_from_stage1,
)
from .data import Collate
from .lm import IMAGE_TOKEN
from .loop import Recipe
from .model import init_weights

QFORMER_INITS = ("text-encoder", "random")
# BLIP names -> Q-Former names, applied in order (the Q-Former calls its attention projections `attention`)
QFORMER_FROM_BLIP = [
    ("text_encoder.embeddings.LayerNorm.", "qformer.layernorm."),
    ("text_encoder.embeddings.", "embeddings."),
    ("text_encoder.encoder.", "qformer.encoder."),
    (".attention.self.", ".attention.attention."),
    (".crossattention.self.", ".crossattention.attention."),
    ("text_proj.", "text_projection."),
    ("vision_proj.", "vision_projection."),
]
# the Q-Former's query positions get a copy of the text feed-forward, as the paper's BERT initialisation does
QUERY_FFN = [(".intermediate.", ".intermediate_query."), (".output.dense.", ".output_query.dense."),
             (".output.LayerNorm.", ".output_query.LayerNorm.")]


def vision_from_blip(blip: Blip) -> VisionModel:
    """A float32 copy of BLIP's ViT as BLIP-2's image encoder: same weights, the key third of the qkv bias zeroed.

    BLIP-2's (EVA) attention has query and value biases only. Dropping BLIP's key bias changes no attention output:
    it adds q·b_k to every score of query q, the same for every key, and the softmax ignores a constant shift.
    """
    vision = copy.deepcopy(blip.vision_model).float()
    with torch.no_grad():
        for layer in vision.encoder.layers:
            bias = layer.self_attn.qkv.bias  # (3H,): query, key, value
            width = bias.shape[0] // 3
            bias[width : 2 * width] = 0
    return vision


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        name = name.replace(old, new)
    return name


def qformer_from_blip(model: Blip2, blip: Blip) -> list[str]:
    """Initialise the Q-Former, its embeddings and heads from BLIP's text encoder, projections and ITM head.

    BLIP-2 starts its Q-Former from BERT; BLIP's text encoder is that BERT trained on images, with the same tokenizer,
    and its cross-attention layers already read this image encoder. Copies every tensor whose BLIP counterpart
    exists (the text feed-forward also into the query one; the first position rows when the Q-Former reads fewer
    tokens); the query tokens stay random. Returns the names copied.
    """
    if not blip.has("text_encoder"):  # then it has no ITM either: the refusal names the ITM checkpoints
        blip.require("itm", "initialise the Q-Former from BLIP (--qformer-init text-encoder)")
    target = dict(model.named_parameters())
    copied = []
    with torch.no_grad():
        for name, value in blip.state_dict().items():
            if not name.startswith(("text_encoder.", "text_proj.", "vision_proj.", "itm_head.")):
                continue
            mapped = _rename(name, QFORMER_FROM_BLIP)
            names = [mapped] + ([_rename(mapped, QUERY_FFN)] if _rename(mapped, QUERY_FFN) != mapped else [])
            for key in (k for k in names if k in target):  # BLIP layers without cross-attention in the Q-Former
                dst = target[key]
                src = value[: dst.shape[0]] if key.endswith("position_embeddings.weight") else value
                if src.shape != dst.shape:
                    raise InputError(
                        f"cannot initialise the Q-Former from BLIP's text encoder: '{key}' is {tuple(dst.shape)}, "
                        f"BLIP's '{name}' {tuple(value.shape)}; use the BLIP text width and at most its layers and "
                        "text length, or --qformer-init random"
                    )
                dst.copy_(src)
                copied.append(key)
    return copied


def stage1_model(
    blip: Blip,
    layers: int | None = None,
    num_queries: int = 8,
    width: int | None = None,
    text_length: int | None = None,
    qformer_init: str = "text-encoder",
    seed: int = 0,
) -> Blip2:
    """A retrieval BLIP-2 for stage 1: `blip`'s ViT, a new Q-Former, BLIP's tokenizer and image preprocessing.

    Args:
        blip: a BLIP model (its image encoder, tokenizer and preprocessing are used).
        layers: Q-Former layers (default: as many as BLIP's text encoder); cross-attention in every second one.
        num_queries: learned query tokens.
        width: Q-Former width (default: the image encoder's); its heads and feed-forward ratio are BLIP's text ones.
        text_length: text tokens the Q-Former reads (default: BLIP's text positions).
        qformer_init: "text-encoder" copies BLIP's text encoder and heads (`qformer_from_blip`), "random" does not.
        seed: seeds the initialisation.
    """
    if qformer_init not in QFORMER_INITS:
        raise InputError(f"--qformer-init {qformer_init}: use one of {', '.join(QFORMER_INITS)}")
    if not isinstance(blip, Blip):
        raise InputError(f"{blip.name_or_path} is a {blip.family} model; stage 1 takes its image encoder from BLIP")
    vc, tc, tok = blip.config.vision_config, blip.config.text_config, blip.tokenizer
    width = width or vc.hidden_size
    if width % tc.num_attention_heads:
        raise InputError(f"--qformer-width {width} is not a multiple of the {tc.num_attention_heads} attention heads "
                         "of the BLIP model's text encoder, which the Q-Former uses")
    if num_queries < 1 or (layers is not None and layers < 1):
        raise InputError("--num-queries and --qformer-layers must be at least 1")
    qformer = TextConfig(
        vocab_size=tok.vocab_size, hidden_size=width, encoder_hidden_size=vc.hidden_size,
        intermediate_size=round(width * tc.intermediate_size / tc.hidden_size),
        num_hidden_layers=layers or tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        max_position_embeddings=text_length or tc.max_position_embeddings, pad_token_id=tok.pad_token_id,
        cross_attention_frequency=2, query_ffn=True, text_ffn=True,
    )
    cfg = Blip2Config(
        dataclasses.replace(vc), qformer, None, num_query_tokens=num_queries,
        image_text_hidden_size=blip.config.image_text_hidden_size, architecture=RETRIEVAL,
        parts=ARCHITECTURES[RETRIEVAL], image_mean=blip.config.image_mean, image_std=blip.config.image_std,
    )
    torch.manual_seed(seed)
    model = Blip2(cfg)
    init_weights(model)
    model.vision_model = vision_from_blip(blip)
    if qformer_init == "text-encoder":
        qformer_from_blip(model, blip)
    model.tokenizer, model.processor = tok, blip.processor
    model.name_or_path = "<stage 1>"
    return model


def stage1_recipe(model: Blip2, objectives: tuple[str, ...] = STAGE1_OBJECTIVES,
                  grad_checkpointing: bool = False) -> Recipe:
    """Stage 1 on the loop: `QFormerObjectives` on BLIP-style caption batches; saves the model and the ITG head."""
    from .. import save

    obj = QFormerObjectives(model, objectives)
    model.qformer.encoder.gradient_checkpointing = grad_checkpointing

    def write(directory) -> None:
        save(model, directory)
        obj.save_itg_head(directory)

    return Recipe(obj, Collate(model.tokenizer, model.config.qformer_config.max_position_embeddings),
                  model.processor, write, find_unused_parameters=set(objectives) != set(STAGE1_OBJECTIVES))


def stage2_model(stage1: Blip2, lm: OPTForCausalLM | T5ForConditionalGeneration, tokenizer: Tokenizer) -> Blip2:
    """A generation BLIP-2: stage 1's image encoder, queries and Q-Former, `lm` (with `tokenizer`), a new projection.

    The language model is used as it is (not copied); the projection maps the Q-Former width onto its input width.
    """
    if not isinstance(stage1, Blip2) or not stage1.has("embeddings"):
        raise CheckpointError(f"{stage1.name_or_path}: not a stage-1 (Blip2ForImageTextRetrieval) checkpoint; "
                              "train one with `blipkit train --stage qformer1`")
    s1, t5 = stage1.config, isinstance(lm, T5ForConditionalGeneration)
    tc = lm.config
    eos = tc.eos_token_id if isinstance(tc.eos_token_id, int) else tc.eos_token_id[0]
    cfg = Blip2Config(
        s1.vision_config, dataclasses.replace(s1.qformer_config, text_ffn=False), tc,
        num_query_tokens=s1.num_query_tokens, image_text_hidden_size=s1.image_text_hidden_size,
        image_token_index=tokenizer.token_to_id(IMAGE_TOKEN),  # the placeholder transformers expands, if reserved
        prompt_bos_token_id=eos if t5 else tc.bos_token_id, lm_context=T5_CONTEXT if t5 else None,
        architecture=GENERATION, parts=ARCHITECTURES[GENERATION], image_mean=s1.image_mean, image_std=s1.image_std,
    )
    with torch.device("meta"):  # the image encoder and the language model come in whole: allocate the rest only
        model = Blip2(cfg)
    model.vision_model, model.language_model = stage1.vision_model, lm
    model.qformer.to_empty(device="cpu")
    model.language_projection.to_empty(device="cpu")
    model.query_tokens = nn.Parameter(torch.empty_like(stage1.query_tokens, device="cpu"))
    init_weights(model.language_projection)
    check_language_model(model)
    init_from_stage1(model, stage1)
    model.tokenizer, model.processor = tokenizer, stage1.processor
    model.name_or_path = "<stage 2>"
    return model


def stage2_recipe(model: Blip2, stage1: Blip2, prompt: str = "", text_length: int | None = None) -> Recipe:
    """Stage 2 on the loop: `GenerativeObjectives` on captions in the language model's tokens."""
    from .. import save

    cfg = model.config
    if prompt and cfg.lm_type == "t5":
        raise InputError("--prompt is for OPT; Flan-T5 learns from each caption split into text input and output")
    room = cfg.context - cfg.num_query_tokens
    if room < 4:
        raise InputError(f"the language model's context of {cfg.context} positions leaves no room for captions after "
                         f"{cfg.num_query_tokens} queries; use a language model with more positions")
    tc = cfg.text_config
    collate = CaptionCollate(model.tokenizer, min(text_length or 64, room), cfg.lm_type, prompt,
                             pad_id=tc.pad_token_id, eos_id=cfg.prompt_bos_token_id)
    return Recipe(GenerativeObjectives(model, stage1), collate, model.processor, lambda d: save(model, d))
