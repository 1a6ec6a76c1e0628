"""The capability tables against what the methods really do, for every model `list_models()` names.

Each preset is stood in for by a tiny reference checkpoint of its architecture (written by transformers, loaded
strictly, so its heads are shaped as the reference's), with the preset's width relations kept (BLIP-large's ViT is
wider than its text stack); the shipped models run themselves. For every model and capability, the method either
works (the table says it can) or raises CapabilityError (the table says it cannot), and every refusal names exactly
the known checkpoints whose table has the capability.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import blipkit
from blipkit import tasks
from blipkit.blip2_config import Blip2Config
from blipkit.capabilities import capability_table, checkpoints_with, known_checkpoints
from blipkit.config import CAPABILITIES, BlipConfig
from blipkit.data.scenes import generate_scene
from blipkit.errors import CapabilityError, InputError

from .conftest import blip_tokenizer, spread_weights, tiny_blip_config
from .test_blip2 import gpt2_tokenizer, itm_tokenizer, t5_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION, ANSWERS = "what color is the circle?", ["red", "blue"]


def probe(model, capability: str, image) -> None:
    """Use `capability` through the public method that needs it, checking the result is well formed."""
    if capability == "itc":
        assert model.similarity(image, ["a red circle", "a blue square"]).shape == (1, 2)
    elif capability == "itm":
        p = model.match(image, ["a red circle", "a blue square"])
        assert p.shape == (1, 2) and bool(((p >= 0) & (p <= 1)).all())
    elif capability == "caption":
        (c,) = model.caption(image, num_beams=1, max_new_tokens=3, min_new_tokens=1)
        assert isinstance(c, str)
    elif capability == "vqa":
        (a,) = model.answer(image, QUESTION, num_beams=1, max_new_tokens=3)
        assert isinstance(a, str)
    elif capability == "rank_answers":
        assert model.answer(image, QUESTION, answers=ANSWERS)[0] in ANSWERS
    elif capability == "generate":
        if not hasattr(model, "generate"):  # BLIP has no instruction method at all
            raise CapabilityError("no generate method")
        (g,) = model.generate(image, "describe the picture", max_new_tokens=3)
        assert isinstance(g, str)
    elif capability == "ground":
        g = tasks.ground(model, image, "a red circle")
        assert len(g.box) == 4 and 0.0 <= g.match <= 1.0
    elif capability == "attention":
        text = "a red circle" if model.family == "BLIP" else None
        assert tasks.cross_attention_maps(model, image, text).maps.dim() == 4
    else:
        raise AssertionError(f"no probe for {capability}")


def named_in(message: str) -> list[str]:
    """The checkpoint names a refusal lists."""
    found = re.search(r"Checkpoints that can: (.*)\.$", message)
    assert found, message
    return found.group(1).split(", ")


def _blip_kind(cfg: BlipConfig) -> tuple[str, bool]:
    return cfg.architecture, cfg.vision_config.hidden_size == cfg.text_config.hidden_size


def _blip2_kind(cfg: Blip2Config) -> str:
    return cfg.lm_type or "itm"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[object, Path]:
    """Tiny reference checkpoints for every kind of preset: BLIP (architecture, equal widths) and BLIP-2 (LM)."""
    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipForQuestionAnswering,
    )

    blip = {"BlipForImageTextRetrieval": BlipForImageTextRetrieval,
            "BlipForConditionalGeneration": BlipForConditionalGeneration,
            "BlipForQuestionAnswering": BlipForQuestionAnswering}
    out: dict[object, Path] = {}
    kinds = {_blip_kind(c) if isinstance(c, BlipConfig) else _blip2_kind(c) for c in known_checkpoints().values()}
    for i, kind in enumerate(sorted(kinds, key=str)):
        torch.manual_seed(i)
        if isinstance(kind, tuple):
            arch, equal = kind
            tok, model = blip_tokenizer(), blip[arch](tiny_blip_config(vision_hidden=32 if equal else 48))
        else:
            tok = {"opt": gpt2_tokenizer, "t5": t5_tokenizer, "itm": itm_tokenizer}[kind]()
            cls = Blip2ForImageTextRetrieval if kind == "itm" else Blip2ForConditionalGeneration
            model = cls(tiny_config(kind, tok))
        spread_weights(model.eval(), seed=i)
        path = tmp_path_factory.mktemp(str(kind).replace("'", "").replace(" ", ""))
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[kind] = path
    return out


def stand_in(name: str, stand_ins: dict[object, Path]):
    """The model that answers for `name`: the shipped model itself, else the tiny checkpoint of its kind."""
    if name in blipkit.shipped_models():
        return blipkit.load(name)
    cfg = known_checkpoints()[name]
    model = blipkit.load(stand_ins[_blip_kind(cfg) if isinstance(cfg, BlipConfig) else _blip2_kind(cfg)])
    assert model.capabilities == cfg.capabilities, name  # the stand-in has the preset's table
    return model


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return generate_scene(random.Random(5), image_size=64).image


@pytest.mark.parametrize("name", blipkit.list_models())
def test_table_agrees_with_the_methods(name, stand_ins, image):
    model = stand_in(name, stand_ins)
    table = capability_table()
    for capability in CAPABILITIES:
        if capability in model.capabilities:
            probe(model, capability, image)
            assert model.can(capability)
            continue
        with pytest.raises(CapabilityError) as refused:
            probe(model, capability, image)
        assert not model.can(capability)
        if "Checkpoints that can" in str(refused.value):  # (BLIP's missing generate method says nothing)
            names = named_in(str(refused.value))
            assert all(capability in table[n] for n in names), (name, capability, names)
            assert sorted(names) == sorted(checkpoints_with(capability)), (name, capability)


def test_vqa_decoder_reads_the_question_in_the_reference():
    """The reference's VQA answer decoder cross-attends to the question encoder's states, never to image patches:
    so blip-vqa-* cannot caption (the table says so), and can answer only when those states are as wide as what
    the decoder's cross-attention takes."""
    from transformers import BlipForQuestionAnswering

    torch.manual_seed(0)
    ref = BlipForQuestionAnswering(tiny_blip_config()).eval()
    seen = []
    key = ref.text_decoder.bert.encoder.layer[0].crossattention.self.key
    key.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    question = torch.tensor([[101, 2054, 3609, 2003, 1996, 4418, 102]])  # [CLS] what color is the circle [SEP]
    with torch.no_grad():
        ref.generate(pixel_values=torch.randn(1, 3, 32, 32), input_ids=question, max_new_tokens=2)
    patches = 1 + (32 // 8) ** 2
    assert seen and set(seen) == {question.shape[1]} != {patches}  # question tokens, not the 17 image keys
    vqa = {"architectures": ["BlipForQuestionAnswering"]}  # what save_pretrained adds
    cfg = BlipConfig.from_hf(ref.config.to_dict() | vqa)
    assert not cfg.decoder_reads_image and "caption" not in cfg.capabilities and "vqa" in cfg.capabilities
    for name in ("blip-vqa-base", "blip-vqa-capfilt-large"):
        preset = blipkit.config.PRESETS[name][1]
        assert preset.architecture == "BlipForQuestionAnswering" and "caption" not in preset.capabilities
    wide = BlipConfig.from_hf(tiny_blip_config(vision_hidden=48).to_dict() | vqa)
    assert wide.capabilities == {"attention"}  # 48-wide cross-attention cannot read 32-wide question states
    assert wide.unable("vqa") == ("its text decoder's cross-attention takes 48-wide inputs and the question "
                                  "encoder's states are 32 wide")


def test_refusal_message_says_why_and_who_can(stand_ins, image):
    vqa = stand_in("blip-vqa-base", stand_ins)
    vqa.name_or_path = "blip-vqa-base"
    with pytest.raises(CapabilityError) as refused:
        vqa.caption(image)
    assert str(refused.value) == (
        "blip-vqa-base cannot caption images: its text decoder is a VQA answer decoder: it reads the question "
        "encoder's states, not the image. Checkpoints that can: scenes-blip, blip-image-captioning-base, "
        "blip-image-captioning-large, scenes-blip2-opt, blip2-opt-2.7b, blip2-opt-6.7b, blip2-opt-2.7b-coco, "
        "blip2-opt-6.7b-coco, blip2-flan-t5-xl, blip2-flan-t5-xxl, blip2-flan-t5-xl-coco."
    )
    with pytest.raises(InputError, match="unknown capability 'fly'"):
        vqa.require("fly")


def test_multi_head_parts_decide():
    """blipkit_parts checkpoints (scenes-blip has every head): the decoder reads the image, and it answers questions
    too when the question encoder's states are as wide as the image features."""
    parts = ["vision_model", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"]
    cfg = BlipConfig.from_hf(tiny_blip_config(vision_hidden=48).to_dict() | {"blipkit_parts": parts})
    assert cfg.decoder_reads_image and cfg.capabilities == {"itc", "itm", "caption", "ground", "attention"}
    same = BlipConfig.from_hf(tiny_blip_config(vision_hidden=32).to_dict() | {"blipkit_parts": parts})
    assert same.capabilities == set(CAPABILITIES) - {"generate"}
    assert known_checkpoints()["scenes-blip"].capabilities == same.capabilities
