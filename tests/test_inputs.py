"""The boundary of the models: images, texts and options either give a right-shaped answer or a BlipkitError.

Runs on the shipped models (scenes-blip, and the BLIP-2 pair scenes-blip2-opt / scenes-blip2-itm), which are small
enough for property-based tests. Explicit cases check the exact messages; hypothesis tries arbitrary inputs.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

import blipkit
from blipkit.base import ImageFeatures
from blipkit.errors import BlipkitError, InputError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def square(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (128, 128), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([30, 30, 90, 90], fill=colour)
    return image


RED, BLUE = square((220, 20, 20)), square((20, 20, 220))


@pytest.fixture(scope="module")
def blip():
    return blipkit.load("scenes-blip")


@pytest.fixture(scope="module")
def opt():
    return blipkit.load("scenes-blip2-opt")


@pytest.fixture(scope="module")
def itm2():
    return blipkit.load("scenes-blip2-itm")


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


# ------------------------------------------------------------------------------------------- several captions
@pytest.mark.parametrize("family", ["blip", "opt"])
def test_beam_captions_grouped_per_image(request, family):
    """num_captions <= num_beams: each image gets its own top beams, the first being its single best caption."""
    model = request.getfixturevalue(family)
    together = model.caption([RED, BLUE], num_beams=3, num_captions=3, max_new_tokens=8)
    alone = [model.caption(x, num_beams=3, num_captions=3, max_new_tokens=8)[0] for x in (RED, BLUE)]
    assert together == alone and [len(c) for c in together] == [3, 3]
    best = [model.caption(x, num_beams=3, max_new_tokens=8)[0] for x in (RED, BLUE)]
    assert [c[0] for c in together] == best
    scored = model.caption([RED, BLUE], num_beams=3, num_captions=2, max_new_tokens=8, return_scores=True)
    assert [[t for t, _ in c] for c in scored] == [c[:2] for c in together]


def test_sampled_captions_grouped_per_image(blip):
    torch.manual_seed(0)
    groups = blip.caption([RED, BLUE], do_sample=True, num_captions=3, max_new_tokens=10)
    assert [len(g) for g in groups] == [3, 3]
    assert all("red" in c and "blue" not in c for c in groups[0])
    assert all("blue" in c and "red" not in c for c in groups[1])


@pytest.mark.parametrize("family", ["blip", "opt"])
def test_extreme_penalty_and_temperature_still_decode(request, family):
    """A repetition penalty or temperature near 0 pushes scores past the float range; decoding goes on (no NaN
    probabilities), and sampling at a temperature near 0 picks what greedy decoding picks."""
    model = request.getfixturevalue(family)
    for options in ({"repetition_penalty": 5e-57, "do_sample": True, "min_new_tokens": 0},
                    {"repetition_penalty": 5e-57, "num_beams": 3}, {"repetition_penalty": 1e300, "do_sample": True},
                    {"temperature": 1e-45, "do_sample": True}):
        out = model.caption([RED, BLUE], max_new_tokens=8, **options)
        assert len(out) == 2 and all(isinstance(c, str) for c in out), options
    greedy = model.caption([RED, BLUE], num_beams=1, max_new_tokens=8)
    assert model.caption([RED, BLUE], num_beams=1, do_sample=True, temperature=1e-45, max_new_tokens=8) == greedy


@pytest.mark.parametrize("family", ["blip", "opt"])
def test_several_greedy_captions_refused(request, family):
    model = request.getfixturevalue(family)
    with pytest.raises(InputError, match=exactly(
        "num_captions=3 needs do_sample=True or num_beams >= 3 (got num_beams=1): greedy decoding gives one "
        "sequence, beam search one per beam"
    )):
        model.caption([RED, BLUE], num_captions=3, num_beams=1)
    with pytest.raises(InputError, match=exactly("num_captions=4 needs do_sample=True or num_beams >= 4 (got "
                                                 "num_beams=3): greedy decoding gives one sequence, beam search one "
                                                 "per beam")):
        model.caption(RED, num_captions=4, num_beams=3)


# ------------------------------------------------------------------------------------------------- options
BAD_OPTIONS = [
    (dict(num_captions=0), "num_captions must be >= 1, got 0"),
    (dict(num_captions=-2), "num_captions must be >= 1, got -2"),
    (dict(num_captions=2.0), "num_captions must be an integer, got 2.0"),
    (dict(num_beams=True), "num_beams must be an integer, got True"),
    (dict(num_beams=0), "num_beams must be >= 1, got 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer, got '5'"),
    (dict(min_new_tokens=-1), "min_new_tokens must be >= 0, got -1"),
    (dict(min_new_tokens=9, max_new_tokens=8), "min_new_tokens (9) cannot exceed max_new_tokens (8)"),
    (dict(do_sample="yes"), "do_sample must be True or False, got 'yes'"),
    (dict(do_sample=1), "do_sample must be True or False, got 1"),
    (dict(temperature=math.nan, do_sample=True), "temperature must be a finite number, got nan"),
    (dict(temperature=0, do_sample=True), "temperature must be > 0, got 0.0"),
    (dict(top_p=0.0, do_sample=True), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(repetition_penalty=-1), "repetition_penalty must be > 0, got -1.0"),
    (dict(length_penalty=math.inf), "length_penalty must be a finite number, got inf"),
    (dict(length_penalty=512), "length_penalty must be at most 10.0, got 512"),
    (dict(length_penalty=-11.5), "length_penalty must be >= -10.0, got -11.5"),
    (dict(return_scores="no"), "return_scores must be True or False, got 'no'"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_caption_option_types_and_ranges(blip, opt, options, message):
    for model in (blip, opt):
        with pytest.raises(InputError, match=exactly(message)):
            model.caption(RED, **options)


def test_answer_and_generate_options(blip, opt):
    with pytest.raises(InputError, match=exactly(
        "answer() got an unknown option 'beams'; its options are max_new_tokens, min_new_tokens, num_beams, "
        "do_sample, temperature, top_p, top_k, repetition_penalty, length_penalty"
    )):
        blip.answer(RED, "what color?", beams=3)
    with pytest.raises(InputError, match="^generate\\(\\) got an unknown option 'num_return_sequences'"):
        opt.generate(RED, "describe", num_return_sequences=2)
    with pytest.raises(InputError, match=exactly("num_candidates must be >= 1, got 0")):
        blip.answer(RED, "what color?", answers=["red"], num_candidates=0)
    with pytest.raises(InputError, match=exactly("top_k must be >= 1, got 0")):
        opt.answer(RED, "what color?", do_sample=True, top_k=0)
    with pytest.raises(InputError, match=exactly("template 'Q: {0}' must be a string with one {} where the "
                                                 "question goes")):
        opt.answer(RED, "what color?", template="Q: {0}")


# --------------------------------------------------------------------------------------- bounded generation
def test_blip_generation_bounded_by_position_table(blip):
    with pytest.raises(InputError, match=exactly(
        "max_new_tokens=10000000 does not fit: 1 prompt tokens (with the start token) + 10000000 = 10000001 "
        "positions, more than the text decoder's 64; lower max_new_tokens to at most 63"
    )):
        blip.caption(RED, max_new_tokens=10**7)
    prompt = "a red square " * 13  # 39 word pieces + [DEC]
    with pytest.raises(InputError, match=exactly(
        "max_new_tokens=100 does not fit: 40 prompt tokens (with the start token) + 100 = 140 positions, more than "
        "the text decoder's 64; lower max_new_tokens to at most 24 or shorten the prompt"
    )):
        blip.caption(RED, prompt=prompt, min_new_tokens=100, max_new_tokens=100)
    with pytest.raises(InputError, match="^max_new_tokens=64 does not fit: 1 prompt tokens"):
        blip.answer(RED, "what color?", max_new_tokens=64)
    # the table filled to its last position: no IndexError
    full = blip.caption(RED, prompt=prompt, min_new_tokens=24, max_new_tokens=24, num_beams=2)[0]
    assert full.startswith(prompt.strip()) and len(full) > len(prompt.strip())


# ------------------------------------------------------------------------------------------------- images
def test_raw_and_bad_image_tensors_refused(blip):
    raw = torch.from_numpy(np.asarray(RED).copy()).permute(2, 0, 1)  # (3, 128, 128) uint8
    with pytest.raises(InputError, match=exactly(
        "the image tensor has dtype torch.uint8: a tensor is taken only as normalised float pixels; pass raw "
        "images as a path or a PIL image (or preprocess them with model.processor)"
    )):
        blip.match(raw, "a red square")
    with pytest.raises(InputError, match="^image 1 \\(a tensor\\) has dtype torch.bool"):
        blip.encode_images([RED, raw.bool()])
    nan = blip.pixels(RED).clone()
    nan[0, 0, 5, 5] = math.nan
    with pytest.raises(InputError, match=exactly("the image tensor contains NaN or infinite values: pass finite "
                                                 "normalised pixels")):
        blip.caption(nan)
    with pytest.raises(InputError, match=exactly(
        "the image tensor has shape (1, 10, 192); preprocessed pixels are (3, 128, 128) or (N, 3, 128, 128) with "
        "N >= 1: pass a path or PIL image instead"
    )):
        blip.match(torch.randn(1, 10, 192), "a red square")  # last size = hidden size: no longer taken as features
    with pytest.raises(InputError, match=exactly(
        "the image tensor has shape (0, 3, 128, 128); preprocessed pixels are (3, 128, 128) or (N, 3, 128, 128) with "
        "N >= 1: pass a path or PIL image instead"
    )):
        blip.match(torch.zeros(0, 3, 128, 128), "a red square")
    with pytest.raises(InputError, match=exactly(
        "the image tensor holds pixel values up to 2.55e+04, not normalised pixels (those lie within a few units of "
        "0; at most 1000 is taken): pass a path or PIL image, or normalise with model.processor"
    )):
        blip.match(blip.pixels(RED) * 0 + 25500.0, "a red square")  # 0-255 values, as floats
    assert blip.match(blip.pixels(RED) * 3, "a red square").shape == (1, 1)  # past the processor's range: taken


@pytest.mark.parametrize("size", [(0, 0), (0, 10), (10, 0)])
def test_empty_pil_images_refused(blip, size):
    with pytest.raises(InputError, match=exactly(f"the PIL image is {size[0]}x{size[1]} pixels, an empty image: pass "
                                                 "an image with pixels")):
        blip.match(Image.new("RGB", size), "a red square")


@pytest.mark.parametrize("family", ["blip", "itm2"])
def test_precomputed_features(request, family):
    model = request.getfixturevalue(family)
    feats = model.image_features([RED, BLUE])
    assert isinstance(feats, ImageFeatures)
    want = model.match([RED, BLUE], ["a red square", "a blue square"])
    assert torch.equal(model.match(feats, ["a red square", "a blue square"]), want)
    assert torch.allclose(model.match(feats[1:], "a blue square"), want[1:, 1:], atol=1e-6)  # batch of one
    assert torch.equal(model.match(feats.as_subclass(torch.Tensor), ["a red square", "a blue square"]), want)
    width = model.config.vision_config.hidden_size
    with pytest.raises(InputError, match=exactly(f"image features have shape (2, {width}) and dtype torch.float32; "
                                                 f"expected float (N, 1 + P, {width}) from image_features()")):
        model.match(feats[:, 0], "a red square")


def test_sixteen_bit_png_scaled_not_white(blip, tmp_path):
    gray = np.asarray(RED.convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    assert torch.equal(blip.pixels(tmp_path / "wide.png"), blip.pixels(Image.fromarray(gray)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_refused(blip, tmp_path, monkeypatch):
    """Above the limit (Pillow only warns up to twice it) and above twice the limit (Pillow refuses)."""
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(InputError, match=exactly(
        f"image file '{tmp_path / 'bomb.png'}' is 100x100 = 10000 pixels, more than the 6000 allowed "
        "(PIL.Image.MAX_IMAGE_PIXELS, a decompression-bomb guard): pass a smaller image"
    )):
        blip.caption(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match=f"^image file '{re.escape(str(tmp_path / 'bomb.png'))}' is too large to "
                       "decode .*: pass a smaller image$"):
        blip.caption(tmp_path / "bomb.png")


@pytest.mark.parametrize("item, kind", [(None, "NoneType"), (b"\x89PNG", "bytes"), ([RED], "list"), (3, "int")])
def test_bad_image_items_named(blip, item, kind):
    with pytest.raises(InputError, match=exactly(f"image 1 is a {kind}: pass a path, a PIL image or a tensor")):
        blip.encode_images([RED, item])


# -------------------------------------------------------------------------------------------------- texts
def test_bare_strings_are_one_text(blip, opt):
    assert blip.answer(RED, "what color is the square?", answers="red") == ["red"]
    assert blip.answer(RED, "what color is the square?", answers=("blue", "red")) == ["red"]
    assert blip.match(RED, "a red square").shape == (1, 1)
    assert blip.caption([RED, BLUE], prompt="a picture")[0].startswith("a picture")
    assert len(opt.answer(RED, "what color is the square?")) == 1


@pytest.mark.parametrize("texts, message", [
    (None, "texts must be a string or a list of strings, got NoneType"),
    ([], "no texts given (empty list)"),
    ("\x00\x01", "text 0 ('\\x00\\x01') is blank: pass text with visible characters"),
    (["a red square", "\u200b \t"], "text 1 ('\\u200b \\t') is blank: pass text with visible characters"),
    (["\ud800abc"], "text 0 is not valid Unicode (character 0 is a lone surrogate '\\ud800'): pass text decoded "
                    "as UTF-8"),
    (["ok", 7], "text 1 is a int, not a string: pass text"),
    ([["nested"]], "text 0 is a list, not a string: pass text"),
])
def test_bad_texts(blip, itm2, texts, message):
    for model in (blip, itm2):
        with pytest.raises(InputError, match=exactly(message)):
            model.match(RED, texts)


def test_bad_questions_answers_prompts(blip, opt):
    with pytest.raises(InputError, match=exactly("answers must be a string or a list of strings, got set")):
        blip.answer(RED, "what color?", answers={"red"})
    with pytest.raises(InputError, match=exactly("answer 1 ('\\x07') is blank: pass text with visible characters")):
        blip.answer(RED, "what color?", answers=["red", "\x07"])
    with pytest.raises(InputError, match=exactly("questions must be a string or a list of strings, got NoneType")):
        opt.answer(RED, None)
    with pytest.raises(InputError, match=exactly("prompt 1 is a int: pass a string (or None for no prompt)")):
        blip.caption([RED, BLUE], prompt=["a picture", 3])
    with pytest.raises(InputError, match=exactly("prompt 0 ('\\x00\\u200b') is blank: pass text with visible "
                                                 "characters")):
        opt.caption(RED, prompt="\x00\u200b")


# ------------------------------------------------------------------------------------------ inference mode
def test_results_carry_no_graph(blip, opt, itm2):
    results = [
        blip.encode_images(RED), blip.encode_texts("a red square"), blip.similarity(RED, "a red square"),
        blip.image_features(RED), blip.itm_logits(RED, "a red square"), blip.match(RED, "a red square"),
        itm2.encode_images(RED), itm2.encode_texts("a red square"), itm2.similarity(RED, "a red square"),
        itm2.qformer_features(RED), itm2.itm_logits(RED, "a red square"), itm2.match(RED, "a red square"),
        opt.qformer_features(RED), opt.image_features(RED),
    ]
    for r in results:
        assert not r.requires_grad and r.grad_fn is None and torch.is_inference(r)
    states, mask = blip._question_states(RED, "what color?")
    assert not blip.answer_logprobs(states, mask, ["red", "blue"]).requires_grad
    # the differentiable paths stay differentiable: GradCAM and training go through them
    assert blip.forward_itm(RED, "a red square").requires_grad
    assert opt.prefix_embeds(RED).requires_grad


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_repeated_match_does_not_keep_memory(blip):
    texts = [f"a red square number {i}" for i in range(100)]
    kept = [blip.match(RED, texts)]
    before = _rss_mb()
    kept += [blip.match(RED, texts) for _ in range(5)]  # with a graph, each result kept ~100 MB alive
    assert _rss_mb() - before < 100
    assert all(k.shape == (1, 100) for k in kept)


# ----------------------------------------------------------------------------------- property-based tests
TEXT_ITEMS = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Cs"]), max_size=5),
    st.builds(lambda t, n: t * n, st.text(min_size=1, max_size=4), st.integers(100, 500)),  # past 64 tokens
)
TEXTS = st.one_of(TEXT_ITEMS, st.lists(st.one_of(TEXT_ITEMS, st.none(), st.integers(), st.binary(max_size=3)),
                                        max_size=4), st.none(), st.integers(), st.binary(max_size=4))


@SETTINGS
@given(texts=TEXTS)
def test_any_texts_answer_or_error(blip, itm2, texts):
    for model in (blip, itm2):
        try:
            out = model.match(RED, texts)
        except BlipkitError:
            continue
        n = 1 if isinstance(texts, str) else len(texts)
        assert out.shape == (1, n) and bool(((out >= 0) & (out <= 1)).all())


DTYPES = [torch.uint8, torch.int8, torch.int64, torch.bool, torch.float16, torch.float32, torch.float64]
SHAPES = st.one_of(st.just((3, 128, 128)), st.just((2, 3, 128, 128)), st.just((1, 65, 192)), st.just((2, 65, 192)),
                   st.lists(st.integers(0, 6), min_size=0, max_size=5).map(tuple))


@st.composite
def tensors(draw):
    shape, dtype = draw(SHAPES), draw(st.sampled_from(DTYPES))
    fill = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=16), st.none()))
    x = torch.randn(shape) if fill is None else torch.full(shape, fill)
    return x.to(dtype) if dtype.is_floating_point else x.clamp(-5, 5).nan_to_num().to(dtype)


MODES = ["1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I;16", "I;16B", "I", "F"]


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(MODES))
    size = draw(st.one_of(st.tuples(st.integers(1, 64), st.integers(1, 64)), st.sampled_from([(1, 1), (1, 3000),
                                                                                               (2500, 2)])))
    return Image.new(mode, size)


@SETTINGS
@given(images=st.one_of(tensors(), pil_images(), st.lists(st.one_of(tensors(), pil_images(), st.none()),
                                                           max_size=3)))
def test_any_images_answer_or_error(blip, opt, images):
    for model in (blip, opt):
        try:
            feats = model.image_features(images)
        except BlipkitError:
            continue
        assert feats.shape[1:] == (65, 192) and bool(torch.isfinite(feats).all())


NUMBERS = st.one_of(st.integers(-2, 6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                    st.text(max_size=2))
OPTION_NAMES = ["num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "do_sample", "temperature",
                "top_p", "num_captions", "length_penalty", "return_scores"]


@SETTINGS
@given(options=st.dictionaries(st.sampled_from(OPTION_NAMES), NUMBERS, max_size=4))
def test_any_caption_options_answer_or_error(blip, opt, options):
    for model in (blip, opt):
        try:
            out = model.caption([RED, BLUE], **options)
        except BlipkitError:
            continue
        k = options.get("num_captions", 1)
        assert len(out) == 2
        groups = [[c] for c in out] if k == 1 else out
        assert all(len(g) == k for g in groups)
        for g in groups:
            for c in g:
                assert isinstance(c, tuple if options.get("return_scores") else str)


ANSWER_OPTIONS = ["num_beams", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                  "repetition_penalty", "length_penalty", "num_candidates", "beams", "template"]


@SETTINGS
@given(options=st.dictionaries(st.sampled_from(ANSWER_OPTIONS), NUMBERS, max_size=3),
       answers=st.one_of(st.none(), TEXTS))
def test_any_answer_options_answer_or_error(blip, opt, options, answers):
    try:
        out = blip.answer(RED, "what color is the square?", answers=answers, **options)
        assert len(out) == 1 and isinstance(out[0], str)
    except BlipkitError:
        pass
    try:
        out = opt.answer(RED, "what color is the square?", **options)
        assert len(out) == 1 and isinstance(out[0], str)
    except BlipkitError:
        pass


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=6))
def test_one_blank_rule_for_the_api_the_command_line_and_the_server(text):
    """The command line's and the server's checks refuse exactly the texts the models' tokenizer check refuses."""
    from blipkit.processing.tokenizer import check_text as model_check
    from blipkit.tasks.inputs import check_text as cli_check

    def refused(check) -> bool:
        try:
            check(text, "text")
        except InputError:
            return True
        return False

    assert refused(cli_check) == refused(model_check)
