"""The shipped `scenes-blip`: loads by name, stays small, keeps the numbers of its model card on a freshly generated
test split (a seed it never saw), and names the colour of single shapes drawn with plain PIL."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image, ImageDraw

import blipkit
from blipkit.data.scenes import write_dataset

NAME = "scenes-blip"
FRESH_SEED = 20261123  # not a seed the model was trained or evaluated on
# Measured on this seed when the model was shipped (MODEL_CARD.md): colour questions 75 %, yes/no 76 %, 80 each.
# The tolerance (10 points) covers the sampling noise of 80 questions.
FRESH = {"color": 0.75, "yes/no": 0.76}
TOLERANCE = 0.10


@pytest.fixture(scope="module")
def model():
    if NAME not in blipkit.list_models():
        pytest.fail(f"{NAME} is not installed with the package")
    return blipkit.load(NAME)


def test_loads_by_name_and_is_small(model):
    directory = blipkit.shipped_models()[NAME]
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size <= 25 * 1024 * 1024
    parts = {"vision_model", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head"}
    assert set(model.config.parts) == parts
    tok, tc = model.tokenizer, model.config.text_config
    assert (tc.bos_token_id, tc.sep_token_id, tc.pad_token_id) == (tok.bos_token_id, tok.sep_token_id, 0)
    assert tc.vocab_size == tok.vocab_size < 300


def test_fresh_split_within_card_tolerance(model, tmp_path):
    root = tmp_path / "fresh"
    write_dataset(root, n_train=0, n_val=0, n_test=80, seed=FRESH_SEED, image_size=128, progress=False)
    qa = json.loads((root / "annotations" / "test_vqa.json").read_text())
    for kind, expected in FRESH.items():
        picked = [q for q in qa if q["question_type"] == kind][:80]
        answers = model.answer([str(root / q["image"]) for q in picked], [q["question"] for q in picked])
        acc = sum(a == q["answer"][0] for a, q in zip(answers, picked, strict=True)) / len(picked)
        assert abs(acc - expected) <= TOLERANCE, f"{kind}: {acc:.2f}, card {expected:.2f} +- {TOLERANCE}"


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


CASES = [
    ("circle", "red"),
    ("square", "blue"),
    ("triangle", "green"),
    ("diamond", "yellow"),
    ("hexagon", "purple"),
    ("star", "orange"),
    ("circle", "black"),
    ("square", "green"),
]


def test_single_pil_shape_colours(model):
    """Colours hold up on shapes drawn by other means; shapes are not learned yet (see MODEL_CARD.md)."""
    images = [draw(s, c) for s, c in CASES]
    colours = model.answer(images, [f"what color is the {s}?" for s, _ in CASES])
    captions = model.caption(images, min_new_tokens=1)
    assert colours == [c for _, c in CASES]
    assert sum(c in cap for cap, (_, c) in zip(captions, CASES, strict=True)) >= 7, captions
