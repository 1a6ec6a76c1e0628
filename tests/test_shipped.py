"""The shipped models (`scenes-blip`, and the BLIP-2 pair `scenes-blip2-itm` / `scenes-blip2-opt`): load by name,
stay small, keep the numbers of their model card on a freshly generated test split (a seed they never saw), and
`scenes-blip` names the colour and shape of single shapes drawn with plain PIL."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, ImageDraw

import blipkit
from blipkit.data.scenes import SHAPES, write_dataset
from blipkit.train.eval import evaluate

NAME = "scenes-blip"
BLIP2 = ("scenes-blip2-itm", "scenes-blip2-opt")
FRESH_SEED = 20261123  # not a seed the model was trained on, nor one of the seeds that set the card's tolerances


@pytest.fixture(scope="module")
def model():
    if NAME not in blipkit.list_models():
        pytest.fail(f"{NAME} is not installed with the package")
    return blipkit.load(NAME)


def test_loads_by_name_and_is_small(model):
    assert directory_size(blipkit.shipped_models()[NAME]) <= 25 * 1024 * 1024
    parts = {"vision_model", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"}
    assert set(model.config.parts) == parts
    tok, tc = model.tokenizer, model.config.text_config
    assert (tc.bos_token_id, tc.sep_token_id, tc.pad_token_id) == (tok.bos_token_id, tok.sep_token_id, 0)
    assert tc.vocab_size == tok.vocab_size < 300


def directory_size(directory) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def test_blip2_pair_loads_and_fits_beside_blip():
    shipped = blipkit.shipped_models()
    assert set(BLIP2) <= set(shipped), sorted(shipped)
    assert sum(directory_size(shipped[n]) for n in (NAME, *BLIP2)) <= 40 * 1024 * 1024
    itm, opt = (blipkit.load(n) for n in BLIP2)
    assert itm.family == opt.family == "BLIP-2"
    assert itm.has("itm_head") and not itm.has("language_model")
    assert opt.has("language_model") and not opt.has("itm_head")
    assert next(itm.parameters()).dtype == torch.float32  # stored in float16, loaded as float32
    # stage 2 starts from stage 1: the same frozen image encoder
    for a, b in zip(itm.vision_model.parameters(), opt.vision_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [NAME, *BLIP2])
def test_fresh_split_within_card_tolerance(name, tmp_path):
    """Every headline metric on 100 freshly generated test images stays within the card's tolerance
    (`eval_results.json`, "fresh": mean over 8 other seeds, tolerance max(3 std, 5 points))."""
    model = blipkit.load(name)
    card = json.loads((blipkit.shipped_models()[name] / "eval_results.json").read_text())["fresh"]
    root = tmp_path / "fresh"
    write_dataset(root, n_train=0, n_val=0, n_test=card["images"], seed=FRESH_SEED, image_size=128, progress=False)
    tasks = card.get("tasks", ("retrieval", "caption", "vqa", "grounding"))
    got = evaluate(model, root, "test", tasks=tasks, k=card["k"], num_beams=card["num_beams"])["metrics"]
    off = [f"{key}: {got[key]:.1f}, card {mean:.1f} +- {card['tolerance'][key]}"
           for key, mean in card["mean"].items() if abs(got[key] - mean) > card["tolerance"][key]]
    assert not off, off


COLOURS = {
    "red": (230, 0, 0),
    "blue": (0, 60, 255),
    "green": (0, 150, 40),
    "yellow": (255, 220, 0),
    "black": (0, 0, 0),
    "purple": (130, 40, 170),
    "orange": (255, 140, 0),
}


def draw(shape: str, colour: str, background: tuple[int, int, int] = (215, 215, 215), size: int = 200) -> Image.Image:
    """One shape drawn with plain PIL calls (not the scene generator), centred, on a light background."""
    image = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(image)
    c, r, fill = size / 2, size * 0.22, COLOURS[colour]
    if shape == "circle":
        d.ellipse((c - r, c - r, c + r, c + r), fill=fill)
    elif shape == "square":
        d.rectangle((c - r, c - r, c + r, c + r), fill=fill)
    elif shape == "triangle":
        d.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(c, c - r), (c + r, c), (c, c + r), (c - r, c)], fill=fill)
    elif shape == "hexagon":
        d.regular_polygon((c, c, r), 6, fill=fill)
    elif shape == "star":
        points = [
            (c + rad * math.cos(math.radians(-90 + 36 * i)), c + rad * math.sin(math.radians(-90 + 36 * i)))
            for i, rad in enumerate([r, 0.4 * r] * 5)
        ]
        d.polygon(points, fill=fill)
    return image


CASES = [(s, c) for s in SHAPES for c in COLOURS]  # every shape in every colour


@pytest.mark.parametrize("background", [(215, 215, 215), (255, 255, 255)], ids=["light-grey", "white"])
def test_single_pil_shape_colour_and_shape(model, background):
    """Shapes drawn by plain PIL on a light grey or a white page: the colour and shape answers, the caption's colour
    and shape words, and ITM among one text per colour are right for every shape in every colour."""
    images = [draw(s, c, background) for s, c in CASES]
    captions = model.caption(images, min_new_tokens=1)
    answers = model.answer(images, [f"what color is the {s}?" for s, _ in CASES])
    shapes = model.answer(images, ["what shape is it?"] * len(CASES))
    colours = list(COLOURS)
    match = model.match(images, [f"a {c} shape" for c in colours])
    for i, (s, c) in enumerate(CASES):
        assert answers[i] == c, (s, c, answers[i])
        assert shapes[i] == s, (s, c, shapes[i])
        assert c in captions[i].split() and s in captions[i].split(), (s, c, captions[i])
        assert colours[int(match[i].argmax())] == c, (s, c, match[i].tolist())
